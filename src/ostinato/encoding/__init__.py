"""Frozen models over audio shards: one loop (``writer``) that reads audio shards, runs a frozen model and writes
one array shard per audio shard plus a manifest; resumable, several decoding workers, several devices, corrupt
samples skipped and counted. Thin adapters say what each model writes:

    tokens    a codec or a fitted semantic tokenizer -> token shards (``ostinato tokenize``)
    arrays    a model that writes arrays (Musika latents, Jukebox VQ-VAE codes) -> array shards (``ostinato encode``)
    mulan     MuLaN embeddings quantized per namespace -> MuLaN tokens (``ostinato prep mulan``)
    semantic  the semantic tokenizer's k-means fit over features of audio shards (``ostinato prep semantic``)
"""
