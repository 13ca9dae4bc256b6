"""``get_model`` returns the identity separator (see the package docstring)."""
from __future__ import annotations


class IdentitySeparator:
    sources = ["drums", "bass", "other", "vocals"]
    samplerate = 32000  # tests keep their melodies at this rate: convert_audio does no resampling
    audio_channels = 1

    def to(self, *args, **kwargs) -> "IdentitySeparator":
        return self


def get_model(name: str) -> IdentitySeparator:
    return IdentitySeparator()
