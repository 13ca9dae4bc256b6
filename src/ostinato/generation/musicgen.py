"""Audio out of a trained MusicGen family: text, melody, style and audio-prompt conditioning, any length.

``generate_audio`` builds the conditions the family was trained with (``MusicGenFamily.condition`` for text, the
melody chromagram and the style tokens as a prefix), decodes codes with ``ostinato.nn.decoding`` and turns them
into audio with the family's codec.

Long outputs: ``LongForm("window", ...)`` is audiocraft's sliding window (each new window is prompted with the
last ``window - stride`` seconds); ``LongForm("chain", ...)`` is UnlimitedMusicGen's chaining of independent
segments joined by a crossfade over their shared ``overlap``. In both, the melody prefix of every window is the
part of the melody (looped when shorter than the output) under that window, as in training, where the chroma of
a segment conditions that segment.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ostinato.generation.request import AudioInput, GenerationRequest
from ostinato.nn.decoding import GenerationParams, Progress, crossfade, generate, generate_chained
from ostinato.models.codec import Codec

__all__ = ["AudioInput", "LongForm", "generate_audio", "load_generator", "require_musicgen"]


@dataclass
class LongForm:
    """How to go past one window: ``mode`` "window" (sliding, ``stride`` s added per extra window) or "chain"
    (segments of ``window`` s sharing ``overlap`` s, crossfaded). ``window`` None = the whole output at once."""

    mode: str = "window"
    window: float | None = None
    stride: float | None = None
    overlap: float = 2.0

    def __post_init__(self) -> None:
        if self.mode not in ("window", "chain"):
            raise ValueError(f"long-form mode must be 'window' or 'chain', got {self.mode!r}")
        if self.window is not None and self.window <= 0:
            raise ValueError(f"long-form window {self.window:g} s must be > 0 (--window)")
        if self.window is None:
            return
        if self.mode == "window" and self.stride is not None and not 0 < self.stride <= self.window:
            raise ValueError(f"long-form stride {self.stride:g} s must be > 0 and at most the window "
                             f"({self.window:g} s): lower --extend-stride or raise --window")
        if self.mode == "chain" and not 0 <= self.overlap < self.window:
            raise ValueError(f"long-form overlap {self.overlap:g} s must be >= 0 and shorter than the window "
                             f"({self.window:g} s): lower --overlap or raise --window")


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


def recorded_codec(cfg: dict | None, strict: bool = False) -> str | None:
    """The codec a MusicGen's stored config names: ``family.codec``, else the one of its training token shards
    (``data.train``); None when neither (or, unless ``strict``, when the token shards cannot be read)."""
    from ostinato.data.tokens import TokenManifest

    cfg = cfg or {}
    ref = (cfg.get("family") or {}).get("codec")
    train = (cfg.get("data") or {}).get("train")
    if ref is None and train is not None:
        try:
            ref = TokenManifest.load(train).codec.id
        except (FileNotFoundError, ValueError):
            if strict:
                raise
    return None if ref is None else str(ref)


def locate_codec(ref: str, model_folder: Path | None) -> str:
    """A codec reference as given, or, for a relative path that does not exist here, the same path under the
    model's folder (an export records its codec relative to itself)."""
    path = Path(ref).expanduser()
    if ref.startswith("//") or path.is_absolute() or path.exists() or model_folder is None:
        return ref
    inside = model_folder / path
    return str(inside) if inside.exists() else ref


def load_generator(model: str, codec: str | None = None, trust: bool = False,
                   ) -> tuple[torch.nn.Module, Codec, dict, str]:
    """A MusicGen (XP signature, //sig/SIG, XP folder, checkpoint, export or ``ostinato import`` folder) and its
    codec -> ``(module in eval mode, codec, the stored config, codec reference)``.

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
    codec_ref = codec or recorded_codec(cfg, strict=True) or getattr(module, "codec_ref", None)
    if codec_ref is None:
        raise UserError(f"--model {model}: no codec recorded (family.codec or token shards); pass --codec")
    folder = Path(ref) if Path(ref).is_dir() else None
    codec_ref = codec or locate_codec(str(codec_ref), folder)
    loaded = load_codec(codec_ref, trust=trust)
    _check_codec(module, loaded)
    module.attach_codec(loaded)
    return module, loaded, cfg, str(codec_ref)


def _check_codec(module: torch.nn.Module, codec: Codec) -> None:
    if module.n_q > codec.n_q or module.card != codec.cardinality:
        raise ValueError(f"the model predicts {module.n_q} x {module.card} codes but the codec has "
                         f"{codec.n_q} x {codec.cardinality}; pass the codec it was trained with (--codec)")


def _style_prefix(module, codec: Codec, style: AudioInput | None, b: int) -> Tensor | None:
    if module.style is None:
        if style is not None:
            raise ValueError("--style given, but this model has no style conditioner (family.style)")
        return None
    if style is None:  # the dropped-style condition the model also trained on
        frames = int(module.style.eval_excerpt_seconds * codec.frame_rate)
        return torch.zeros(b, module.style.num_tokens(frames), module.cfg.dim, device=module.lm.emb[0].weight.device)
    wav = style.at(codec.sample_rate, codec.channels).to(module.lm.emb[0].weight.device)
    codes = codec.encode(wav, n_q=module.n_q).codes
    module.style.eval()
    tokens, _ = module.style_tokens(codes, train=False, wav=wav)
    return tokens.expand(b, -1, -1)


def _melody_chroma(module, melody: AudioInput, need: int, device: torch.device) -> Tensor:
    """``[1, need, 12]``: the reference's chromagram, looped when shorter than the output, cropped when longer."""
    chroma = module.melody.features(melody.wav[None].float().to(device), melody.sample_rate)  # [1, F, 12]
    if chroma.shape[1] < need:
        chroma = chroma.repeat(1, -(-need // chroma.shape[1]), 1)
    return chroma[:, :need]


def _melody_prefix(module, codec: Codec, melody: AudioInput | Sequence[AudioInput] | None, b: int,
                   total_frames: int) -> Callable[[int, int], Tensor] | None:
    if module.melody is None:
        if melody is not None:
            raise ValueError("--melody given, but this model has no melody conditioner (family.melody)")
        return None
    device = module.lm.emb[0].weight.device
    fr, mel = float(codec.frame_rate), module.melody
    if melody is None:
        return lambda start, n: torch.zeros(b, module.melody_frames(n, fr), module.cfg.dim, device=device)
    need = module.melody_frames(total_frames, fr) + 1
    melodies = [melody] if isinstance(melody, AudioInput) else list(melody)
    if len(melodies) not in (1, b):
        raise ValueError(f"{len(melodies)} melodies for {b} prompts: give one melody, or one per prompt")
    chroma = torch.cat([_melody_chroma(module, m, need, device) for m in melodies]).expand(b, -1, -1)

    def window(start: int, n: int) -> Tensor:
        first = round(start / fr * mel.frame_rate)
        return mel(chroma[:, first:first + module.melody_frames(n, fr)])

    return window


@torch.no_grad()
def generate_audio(module: torch.nn.Module, codec: Codec, prompts: Sequence[str], seconds: float,
                   params: GenerationParams, *, melody: AudioInput | Sequence[AudioInput] | None = None,
                   style: AudioInput | None = None,
                   continuation: AudioInput | None = None, long_form: LongForm | None = None,
                   progress: Progress | None = None) -> Tensor:
    """One clip per prompt ("" = no text) -> wav ``[B, C, round(seconds * sample_rate)]``.

    ``continuation``: the clips start with this audio (its codes are the prompt) and go on to ``seconds`` in all.
    ``melody``: one reference for every prompt, or one per prompt; ``style``: one reference. ``long_form``: see
    ``LongForm`` (default: one window).
    """
    _check_codec(module, codec)
    module.eval()
    module.attach_codec(codec)
    long_form = long_form or LongForm()
    fr, b = float(codec.frame_rate), len(prompts)
    frames = max(1, round(seconds * fr))
    device = module.lm.emb[0].weight.device
    cond, mask = module.condition(list(prompts))
    style_tokens = _style_prefix(module, codec, style, b)
    melody_fn = _melody_prefix(module, codec, melody, b, frames)
    prefix = None
    if style_tokens is not None or melody_fn is not None:
        def prefix(start: int, n: int) -> Tensor:
            return module.prefix(style_tokens, None if melody_fn is None else melody_fn(start, n))
    prompt = None
    if continuation is not None:
        wav = continuation.at(codec.sample_rate, codec.channels).to(device)
        prompt = codec.encode(wav, n_q=module.n_q).codes.expand(b, -1, -1)
        if prompt.shape[-1] >= frames:
            raise ValueError(f"the continued audio ({prompt.shape[-1] / fr:.2f} s) is not shorter than the "
                             f"requested duration ({seconds:g} s); ask for a longer --duration")
    window = None if long_form.window is None else max(1, round(long_form.window * fr))
    n_samples = round(seconds * codec.sample_rate)
    chain = long_form.mode == "chain" and window is not None and window < frames
    stride = None if long_form.stride is None else max(1, round(long_form.stride * fr))
    head = None
    if prompt is not None and window is not None and prompt.shape[-1] >= window:
        # a prompt longer than a window: its start is kept as is, its last frames are the context of the decoding
        keep = round(long_form.overlap * fr) if chain else window - (stride or max(1, window // 2))
        keep = max(1, min(keep, window - 1))
        head, prompt = prompt[..., :-keep], prompt[..., -keep:]
        frames -= head.shape[-1]
        if prefix is not None:
            offset, whole = head.shape[-1], prefix
            prefix = lambda start, n: whole(start + offset, n)  # noqa: E731
    if chain:
        overlap = round(long_form.overlap * fr)
        res = generate_chained(module.lm, module.pattern, frames, segment_frames=window, overlap_frames=overlap,
                               cond=cond, cond_mask=mask, prompt=prompt, params=params, batch_size=b,
                               progress=progress, prefix=prefix)
        segments = list(res.segments)
        if head is not None:
            segments[0] = torch.cat([head, segments[0]], dim=-1)
        wavs = [codec.decode(seg) for seg in segments]
        return crossfade(wavs, overlap * codec.hop_length)[..., :n_samples]
    if window is not None:
        params = GenerationParams(**{**params.__dict__, "max_window_frames": window,
                                     "extend_stride_frames": stride})
    codes = generate(module.lm, module.pattern, frames, cond=cond, cond_mask=mask, prompt=prompt, params=params,
                     batch_size=b, progress=progress, prefix=prefix)
    if head is not None:
        codes = torch.cat([head, codes], dim=-1)
    return codec.decode(codes)[..., :n_samples]


def generate_clips(request: GenerationRequest, progress: Progress) -> tuple[Tensor, int, list[dict]]:
    """``ostinato generate --model MUSICGEN``: text / melody / style / continuation -> clips and their records."""
    module, codec, cfg, codec_ref = load_generator(request.model, request.codec, trust=request.trust)
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
    return wavs, codec.sample_rate, records
