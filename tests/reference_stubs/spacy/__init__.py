"""Stand-in for spacy, which audiocraft's conditioners import (only its lemmatizing text normalizer uses it)."""


def load(*args, **kwargs):
    raise RuntimeError("spacy is a stub in the tests")
