"""Stand-in for demucs, which audiocraft's ``ChromaStemConditioner`` loads: an identity "separator" whose stems sum
to the input mix (the ``vocals`` stem is the mix, the others silence). With it audiocraft computes the chroma of
the whole melody, which is what an ostinato import does (it has no demucs): the LM parity is then tested on the
same chroma input."""
