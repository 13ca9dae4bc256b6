"""Each family's generation entry (``generate_clips(request, progress)``, found through ``ostinato.registry``),
long form and the multi-stage pipelines; the decoding loop itself is ``ostinato.nn.decoding``."""
