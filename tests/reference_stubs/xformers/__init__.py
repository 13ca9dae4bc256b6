"""Stand-in for xformers, which audiocraft imports at module level; the tests use its torch attention backend."""
