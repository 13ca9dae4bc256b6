"""Audio out of a MusicGen: ``ostinato generate`` / eval / app's entry (``generate_clips``, ``load_generator``).

The model (``ostinato.models.musicgen.MusicGen``) does the work: ``MusicGen.generate`` builds the conditions it
was trained with, decodes codes with ``ostinato.nn.decoding`` and turns them into audio with its codec; long
outputs are ``LongForm`` windows or chains. This module finds the model and its codec from a reference and turns a
``GenerationRequest`` into clips and their records.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ostinato.generation.request import AudioInput, GenerationRequest
from ostinato.models.codec import Codec
from ostinato.models.musicgen import LongForm, MusicGen, locate, recorded_codec
from ostinato.nn.decoding import GenerationParams, Progress

__all__ = ["AudioInput", "LongForm", "generate_audio", "load_generator", "require_musicgen", "generate_clips"]


# what a model that is not a MusicGen is, and which verb or flag takes it (by its family class)
_NOT_MUSICGEN = {"CodecFamily": ("a codec", "give it as --codec, or evaluate it with `ostinato eval codec_demo --model "
                                            "REF`"),
                 "MusikaAutoencoderFamily": ("a Musika autoencoder", "give it as --codec with --family musika"),
                 "MusikaFamily": ("a Musika GAN", "use --family musika"),
                 "JukeboxVQVAEFamily": ("a Jukebox VQ-VAE", "use --family jukebox"),
                 "JukeboxPrior": ("a Jukebox prior", "use --family jukebox"),
                 "MuLaNFamily": ("a MuLaN", "give it as --mulan with --family musiclm"),
                 "SemanticStage": ("a MusicLM stage", "use --family musiclm --semantic/--coarse/--fine"),
                 "CoarseStage": ("a MusicLM stage", "use --family musiclm --semantic/--coarse/--fine"),
                 "FineStage": ("a MusicLM stage", "use --family musiclm --semantic/--coarse/--fine")}


def family_kind(cfg: dict | None) -> str:
    """The class name of the family a stored config builds (``family._target_``), or ``""``."""
    target = ((cfg or {}).get("family") or {}).get("_target_") or ""
    return str(target).rsplit(".", 1)[-1]


def require_musicgen(model: str, cfg: dict | None) -> None:
    """Refuse, in one line, a model that is not a MusicGen (a codec, a Musika, ...), naming what takes it."""
    from ostinato.errors import UserError

    kind = family_kind(cfg)
    if kind in _NOT_MUSICGEN:
        what, fix = _NOT_MUSICGEN[kind]
        raise UserError(f"--model {model} is {what} ({kind}), not a MusicGen; generation needs a MusicGen (an XP, "
                        f"export or import folder) and decodes with its codec; {fix}")


def load_generator(model: str, codec: str | None = None, trust: bool = False,
                   ) -> tuple[MusicGen, Codec, dict, str]:
    """A MusicGen (XP signature, //sig/SIG, XP folder, checkpoint, export or ``ostinato import`` folder) and its
    codec -> ``(model in eval mode, codec, the stored config, codec reference)``.

    The codec is ``codec`` if given, else ``family.codec`` of the stored config, else the one recorded in the
    training token shards' manifest. A relative codec path that does not exist from here is looked up in the
    model's folder.
    """
    import ostinato
    from ostinato.store.records import read_weights
    from ostinato.errors import UserError
    from ostinato.interop.codecs import CODEC_KINDS, load_codec
    from ostinato.store.records import require_ref, xps_dir

    ref = require_ref(model, "--model", "a MusicGen: an XP folder, a checkpoint, an export or import folder")
    codec = require_ref(codec, "--codec", CODEC_KINDS) if codec else None
    _, cfg, _ = read_weights(ref, xps_dir(), trust)
    cfg = cfg or {}
    require_musicgen(model, cfg)
    module = ostinato.load(ref, xps_dir=xps_dir(), trust=trust)
    if not isinstance(module, MusicGen):
        raise UserError(f"--model {model} holds a {type(module).__name__}, not a MusicGen")
    codec_ref = codec or recorded_codec(cfg, strict=True) or module.codec_ref
    if codec_ref is None:
        raise UserError(f"--model {model}: no codec recorded (family.codec or token shards); pass --codec")
    folder = Path(ref) if Path(ref).is_dir() else None
    codec_ref = codec or locate(str(codec_ref), folder)
    loaded = load_codec(codec_ref, trust=trust)
    module.attach_codec(loaded)
    return module, loaded, cfg, str(codec_ref)


@torch.no_grad()
def generate_audio(model: MusicGen, codec: Codec, prompts: Sequence[str], seconds: float,
                   params: GenerationParams, *, melody: AudioInput | Sequence[AudioInput] | None = None,
                   style: AudioInput | None = None, continuation: AudioInput | None = None,
                   long_form: LongForm | None = None, progress: Progress | None = None) -> Tensor:
    """``model.generate`` with ``codec`` attached: one clip per prompt -> wav ``[B, C, round(seconds * sr)]``."""
    model.attach_codec(codec)
    return model.generate(list(prompts), seconds, melody=melody, style=style, continuation=continuation,
                          params=params, progress=progress, long_form=long_form)


def generate_clips(request: GenerationRequest, progress: Progress) -> tuple[Tensor, int, list[dict]]:
    """``ostinato generate --model MUSICGEN``: text / melody / style / continuation -> clips and their records."""
    module, codec, cfg, codec_ref = load_generator(request.model, request.codec, trust=request.trust)
    module.to(request.device)
    codec.to(request.device)
    if request.style_eval_q is not None or request.style_excerpt is not None:
        if module.style is None:
            raise ValueError("--style-eval-q / --style-excerpt: this model has no style conditioner")
        if request.style_eval_q is not None:
            if not 1 <= request.style_eval_q <= module.style.n_q:
                raise ValueError(f"--style-eval-q must be in [1, {module.style.n_q}], got {request.style_eval_q}")
            module.style.eval_q = request.style_eval_q
        if request.style_excerpt is not None:
            module.style.eval_excerpt_seconds = request.style_excerpt
    prompts = list(request.prompts) or [""]
    window = request.window if request.window is not None else (cfg.get("data") or {}).get("segment_seconds")
    long_form = LongForm(mode=request.long_form, window=window, stride=request.extend_stride,
                         overlap=request.overlap)
    params = request.params
    wavs = generate_audio(module, codec, prompts, request.duration, params, melody=request.melody,
                          style=request.style, continuation=request.continuation, long_form=long_form,
                          progress=progress)
    inputs = request.inputs
    records = [{"prompt": prompt, "family": "musicgen", "model": request.model, "codec": str(codec_ref),
                "duration": request.duration, "melody": inputs.get("melody"), "style": inputs.get("style"),
                "continue": inputs.get("continue"),
                "style_eval_q": None if module.style is None else module.style.eval_q,
                "style_excerpt": None if module.style is None else module.style.eval_excerpt_seconds,
                "long_form": long_form.__dict__, **params.__dict__} for prompt in prompts]
    return wavs.cpu(), codec.sample_rate, records
