"""Semantic tokens of the MusicLM family (AudioLM / MusicLM): frame features -> the index of the nearest k-means
centroid, one token stream at 25 or 50 Hz.

    wav [B, C, T] -> mono, resampled to the features' rate -> features [B, F, D], F = ceil(T / hop)
      -> (x - mean) / std per dimension -> nearest of K centroids -> tokens [B, 1, F] int64

Features: ``MFCCFeatures`` (MFCC + deltas, what HuBERT's first iteration clustered; the default), ``LogMelFeatures``,
or ``SSLFeatures`` (a hidden layer of any transformers SSL encoder from a local folder: HuBERT, MERT, w2v-BERT...),
average-pooled or interpolated to the requested frame rate. ``SemanticTokenizer`` quacks like a codec
(``sample_rate``, ``channels``, ``frame_rate``, ``hop_length``, ``n_q = 1``, ``card = K``, ``encode``), so
``ostinato tokenize`` writes its tokens into ordinary token shards. It is fitted by
``ostinato.encoding.semantic.fit_semantic_tokenizer`` (``ostinato prep semantic``).

A fitted tokenizer is a folder::

  semantic_tokenizer.safetensors   centroids [K, D], mean [D], std [D] (float32)
  semantic_tokenizer.json          format, features config, K, D, rates, hash, fit statistics (written last)
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchaudio
import torchaudio.functional as AF
from torch import Tensor, nn

from ostinato.data.audio import resample
from ostinato.fileio import atomic_path, atomic_write_json, read_json

__all__ = ["SemanticFeatures", "MFCCFeatures", "LogMelFeatures", "SSLFeatures", "SemanticTokenizer",
           "make_features", "features_from_config", "is_semantic_tokenizer"]

FORMAT = "ostinato.semantic-tokenizer/1"
CONFIG_NAME = "semantic_tokenizer.json"
WEIGHTS_NAME = "semantic_tokenizer.safetensors"


def _hop(sample_rate: int, frame_rate: float, what: str) -> int:
    hop = sample_rate / frame_rate
    if frame_rate <= 0 or abs(hop - round(hop)) > 1e-6:
        raise ValueError(f"{what}: frame_rate={frame_rate:g} Hz does not divide sample_rate={sample_rate} Hz into "
                         "whole samples; use e.g. 25 or 50 Hz")
    return int(round(hop))


def _mono(wav: Tensor, sample_rate: int, target_rate: int) -> Tensor:
    """wav [B, C, T] -> [B, T'] float32 mono at ``target_rate``."""
    if wav.dim() != 3:
        raise ValueError(f"expected wav [B, C, T], got {tuple(wav.shape)}")
    if wav.shape[-1] < 1:
        raise ValueError("empty audio: give at least one sample")
    return resample(wav.detach().float().mean(dim=1), int(sample_rate), int(target_rate))


class SemanticFeatures(nn.Module):
    """Frame features with a declared ``sample_rate``, ``frame_rate`` (``hop_length = sample_rate / frame_rate``)
    and width ``dim``: ``forward(wav [B, C, T], sample_rate) -> [B, ceil(T' / hop_length), dim]`` float32, where T'
    is the length at ``sample_rate``. ``config()`` rebuilds it through ``features_from_config``."""

    kind: str = ""
    sample_rate: int
    frame_rate: float
    hop_length: int
    dim: int
    in_workers: bool = True  # cheap enough for DataLoader workers on the CPU

    def num_frames(self, num_samples: int) -> int:
        """F for ``num_samples`` samples at ``sample_rate``: ceil(T / hop_length)."""
        return -(-int(num_samples) // self.hop_length)

    def config(self) -> dict[str, Any]:
        raise NotImplementedError


class _MelFrames(SemanticFeatures):
    """Power mel spectrogram frames: window 2 hops (80 ms at 25 Hz), centred, zero padded at the edges."""

    def __init__(self, sample_rate: int, frame_rate: float, n_mels: int, f_min: float, f_max: float | None):
        super().__init__()
        self.sample_rate, self.frame_rate = int(sample_rate), float(frame_rate)
        self.hop_length = _hop(self.sample_rate, self.frame_rate, type(self).__name__)
        win = 2 * self.hop_length
        self.n_mels, self.f_min, self.f_max = int(n_mels), float(f_min), f_max
        # Constant padding: reflection needs inputs longer than half a window; zeros take any length.
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=self.sample_rate, n_fft=1 << (win - 1).bit_length(), win_length=win,
            hop_length=self.hop_length, f_min=self.f_min, f_max=f_max, n_mels=self.n_mels, power=2.0, center=True,
            pad_mode="constant")

    def log_mel(self, wav: Tensor, sample_rate: int) -> Tensor:
        """[B, C, T] -> log mel [B, n_mels, F]; per item, so a batch gives what each item alone gives."""
        x = _mono(wav, sample_rate, self.sample_rate)
        return torch.log(self.mel(x)[..., : self.num_frames(x.shape[-1])] + 1e-6)


class MFCCFeatures(_MelFrames):
    """MFCC (+ deltas and delta-deltas when ``deltas``) -> [B, F, n_mfcc * (3 if deltas else 1)].

    HuBERT's first iteration clustered 13 MFCC + deltas + delta-deltas (39 dims); 64 mel bands suit music better than
    speech's 23. No top-dB clipping: torchaudio's clips relative to the whole batch, which would tie items together.
    """

    kind = "mfcc"

    def __init__(self, sample_rate: int = 16000, frame_rate: float = 25.0, n_mfcc: int = 13, n_mels: int = 64,
                 deltas: bool = True, f_min: float = 20.0, f_max: float | None = None):
        super().__init__(sample_rate, frame_rate, n_mels, f_min, f_max)
        if not 1 <= n_mfcc <= n_mels:
            raise ValueError(f"n_mfcc={n_mfcc} must be in [1, n_mels={n_mels}]")
        self.n_mfcc, self.deltas = int(n_mfcc), bool(deltas)
        self.dim = self.n_mfcc * (3 if deltas else 1)
        self.register_buffer("dct", AF.create_dct(self.n_mfcc, self.n_mels, norm="ortho"), persistent=False)

    def forward(self, wav: Tensor, sample_rate: int) -> Tensor:
        """wav [B, C, T] at ``sample_rate`` -> [B, F, dim] float32."""
        mfcc = torch.einsum("bmf,mc->bcf", self.log_mel(wav, sample_rate), self.dct)
        if self.deltas:
            d1 = AF.compute_deltas(mfcc)
            mfcc = torch.cat([mfcc, d1, AF.compute_deltas(d1)], dim=1)
        return mfcc.transpose(1, 2).contiguous()

    def config(self) -> dict[str, Any]:
        return dict(kind=self.kind, sample_rate=self.sample_rate, frame_rate=self.frame_rate, n_mfcc=self.n_mfcc,
                    n_mels=self.n_mels, deltas=self.deltas, f_min=self.f_min, f_max=self.f_max)


class LogMelFeatures(_MelFrames):
    """Log mel energies -> [B, F, n_mels]."""

    kind = "logmel"

    def __init__(self, sample_rate: int = 16000, frame_rate: float = 25.0, n_mels: int = 64, f_min: float = 20.0,
                 f_max: float | None = None):
        super().__init__(sample_rate, frame_rate, n_mels, f_min, f_max)
        self.dim = self.n_mels

    def forward(self, wav: Tensor, sample_rate: int) -> Tensor:
        """wav [B, C, T] at ``sample_rate`` -> [B, F, n_mels] float32."""
        return self.log_mel(wav, sample_rate).transpose(1, 2).contiguous()

    def config(self) -> dict[str, Any]:
        return dict(kind=self.kind, sample_rate=self.sample_rate, frame_rate=self.frame_rate, n_mels=self.n_mels,
                    f_min=self.f_min, f_max=self.f_max)


def _folder_fingerprint(folder: Path) -> str:
    """sha256 of config.json plus the names and sizes of the weight files: cheap, catches a swapped model."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for p in sorted(folder.iterdir()):
        if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt"):
            h.update(f"{p.name}:{p.stat().st_size}".encode())
    return h.hexdigest()[:16]


class SSLFeatures(SemanticFeatures):
    """A hidden layer of a frozen transformers SSL encoder (HuBERT, MERT, wav2vec2, w2v-BERT...) in a local folder.

    The model's own frames (e.g. HuBERT's 50 Hz) are converted to ``frame_rate``: average pooling over whole
    groups of frames when the rate divides the model's (``pooling="avg"``, e.g. 50 -> 25 Hz), else linear
    interpolation. Inputs are zero padded by one receptive field less one sample, so any length gives
    ceil(T / hop) frames. The model (``HFAudioFeatures``) is not a registered submodule: it never enters a state
    dict and follows its input's device.
    """

    kind = "hf"
    in_workers = False

    def __init__(self, path: str | Path, layer: int | None = None, frame_rate: float | None = None,
                 pooling: str = "avg", trust_remote_code: bool = False):
        super().__init__()
        from ostinato.nn.style import HFAudioFeatures

        if pooling not in ("avg", "linear"):
            raise ValueError(f"pooling={pooling!r}: use 'avg' or 'linear'")
        self.hf = HFAudioFeatures(str(path), layer=layer, trust_remote_code=trust_remote_code)
        self.path, self.layer, self.pooling, self.trust_remote_code = self.hf.path, layer, pooling, trust_remote_code
        self.sample_rate, self.dim = self.hf.sample_rate, self.hf.dim
        self.model_hop = _hop(self.sample_rate, self.hf.frame_rate, self.path)
        self.frame_rate = float(frame_rate or self.hf.frame_rate)
        self.hop_length = _hop(self.sample_rate, self.frame_rate, f"{self.path} features")
        self.fingerprint = _folder_fingerprint(Path(self.path))

    def forward(self, wav: Tensor, sample_rate: int) -> Tensor:
        """wav [B, C, T] at ``sample_rate`` -> [B, F, dim] float32, F = ceil(T' / hop_length)."""
        x = _mono(wav, sample_rate, self.sample_rate)
        t = x.shape[-1]
        own = -(-t // self.model_hop)
        h = self.hf(F.pad(x, (0, self.hf.min_samples - 1))[:, None], self.sample_rate)[:, :own]
        if h.shape[1] < own:  # a conv stack whose frames do not follow ceil(T / hop) exactly
            h = torch.cat([h, h[:, -1:].expand(-1, own - h.shape[1], -1)], dim=1)
        frames = self.num_frames(t)
        if frames == own:
            return h.contiguous()
        h = h.transpose(1, 2)
        ratio = self.hop_length / self.model_hop
        if self.pooling == "avg" and ratio == int(ratio):
            h = F.avg_pool1d(h, int(ratio), int(ratio), ceil_mode=True)
        else:
            h = F.interpolate(h, size=frames, mode="linear", align_corners=False)
        return h[..., :frames].transpose(1, 2).contiguous()

    def config(self) -> dict[str, Any]:
        return dict(kind=self.kind, path=self.path, layer=self.layer, sample_rate=self.sample_rate,
                    frame_rate=self.frame_rate, pooling=self.pooling, trust_remote_code=self.trust_remote_code,
                    fingerprint=self.fingerprint)


def make_features(spec: str, *, frame_rate: float | None = 25.0, layer: int | None = None,
                  sample_rate: int = 16000, trust_remote_code: bool = False) -> SemanticFeatures:
    """``mfcc`` | ``logmel`` | ``hf:/folder`` (a transformers SSL model saved with ``save_pretrained``)."""
    if spec in ("mfcc", "logmel"):
        if layer is not None:
            raise ValueError(f"--layer is for hf:/folder features, not {spec}")
        cls = MFCCFeatures if spec == "mfcc" else LogMelFeatures
        return cls(sample_rate=sample_rate, frame_rate=25.0 if frame_rate is None else frame_rate)
    if spec.startswith("hf:"):
        return SSLFeatures(spec[3:], layer=layer, frame_rate=frame_rate, trust_remote_code=trust_remote_code)
    raise ValueError(f"features {spec!r}: use mfcc, logmel or hf:/path/to/model_folder")


def features_from_config(cfg: dict[str, Any], origin: str = "features") -> SemanticFeatures:
    """Rebuild features from ``SemanticFeatures.config()``; an SSL model must still be the one fitted on."""
    cfg = dict(cfg)
    kind = cfg.pop("kind", None)
    if kind == "mfcc":
        return MFCCFeatures(**cfg)
    if kind == "logmel":
        return LogMelFeatures(**cfg)
    if kind == "hf":
        if not (Path(cfg["path"]) / "config.json").is_file():
            raise FileNotFoundError(f"{origin}: SSL model folder {cfg['path']} not found; put it back or edit "
                                    "features.path there to where the same model now lies")
        feats = SSLFeatures(cfg["path"], layer=cfg.get("layer"), frame_rate=cfg.get("frame_rate"),
                            pooling=cfg.get("pooling", "avg"), trust_remote_code=cfg.get("trust_remote_code", False))
        if cfg.get("fingerprint") and feats.fingerprint != cfg["fingerprint"]:
            raise ValueError(f"{origin}: the model in {cfg['path']} is not the one the tokenizer was fitted on "
                             f"(fingerprint {feats.fingerprint} != {cfg['fingerprint']}); restore that model or "
                             "refit with `ostinato prep semantic`")
        return feats
    raise ValueError(f"{origin}: unknown features kind {kind!r} (mfcc, logmel or hf)")


def is_semantic_tokenizer(path: str | Path) -> bool:
    """Whether ``path`` is a fitted semantic tokenizer folder."""
    return Path(str(path)).is_dir() and (Path(str(path)) / CONFIG_NAME).is_file()


class SemanticTokenizer(nn.Module):
    """Features -> per-dimension normalisation -> nearest centroid: ``tokens(wav [B, C, T], sr) -> [B, 1, F]``.

    Args:
        features: the frame features (``make_features``).
        centroids: [K, D] in normalised feature space.
        mean, std: [D] per-dimension statistics of the fitting corpus.
        fit: statistics of the fit, kept in the saved json.
    """

    n_q = 1
    channels = 1

    def __init__(self, features: SemanticFeatures, centroids: Tensor, mean: Tensor, std: Tensor,
                 fit: dict[str, Any] | None = None):
        super().__init__()
        k, d = centroids.shape
        if d != features.dim or mean.shape != (d,) or std.shape != (d,):
            raise ValueError(f"centroids {tuple(centroids.shape)}, mean {tuple(mean.shape)}, std "
                             f"{tuple(std.shape)} do not match features of width {features.dim}")
        self.features = features
        self.register_buffer("centroids", centroids.detach().float().contiguous())
        self.register_buffer("mean", mean.detach().float().contiguous())
        self.register_buffer("std", std.detach().float().clamp_min(1e-5).contiguous())
        self.fit_stats = dict(fit or {})

    # -- the codec contract ---------------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return self.features.sample_rate

    @property
    def frame_rate(self) -> float:
        return self.features.frame_rate

    @property
    def hop_length(self) -> int:
        return self.features.hop_length

    @property
    def card(self) -> int:
        return self.centroids.shape[0]

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    @property
    def hash(self) -> str:
        """sha256 of the features config (without the model's path) and the tensors: the tokens' identity."""
        cfg = {k: v for k, v in self.features.config().items() if k != "path"}
        h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
        for t in (self.centroids, self.mean, self.std):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def id(self) -> str:
        return f"semantic-{self.features.kind}-k{self.card}-{self.frame_rate:g}hz-{self.hash}"

    def num_frames(self, num_samples: int) -> int:
        return self.features.num_frames(num_samples)

    # -- tokens ---------------------------------------------------------------------------------------------
    def normalize(self, features: Tensor) -> Tensor:
        """[..., D] -> [..., D], per-dimension standardised with the fitting corpus' statistics."""
        return (features.to(self.mean) - self.mean) / self.std

    def assign(self, z: Tensor, chunk: int = 8192) -> Tensor:
        """Normalised features [N, D] -> nearest centroid [N] int64 (squared Euclidean distance)."""
        c = self.centroids
        c2 = (c * c).sum(dim=1)
        out = [torch.addmm(c2[None], x, c.t(), alpha=-2.0).argmin(dim=1) for x in z.split(chunk)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=z.device)

    @torch.no_grad()
    def tokens(self, wav: Tensor, sample_rate: int) -> Tensor:
        """wav [B, C, T] at ``sample_rate`` -> tokens [B, 1, F] int64 in [0, K), F = ceil(T' / hop_length)."""
        feats = self.features(wav.to(self.centroids.device), sample_rate)
        b, f, d = feats.shape
        return self.assign(self.normalize(feats).reshape(b * f, d)).reshape(b, 1, f)

    def encode(self, wav: Tensor, n_q: int | None = None) -> Tensor:
        """Codec interface: wav [B, C, T] at ``sample_rate`` -> [B, 1, F] (``n_q`` must be 1 or None)."""
        if n_q not in (None, 1):
            raise ValueError(f"n_q={n_q}: a semantic tokenizer has a single token stream")
        return self.tokens(wav, self.sample_rate)

    forward = tokens

    # -- files ----------------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return dict(format=FORMAT, id=self.id, hash=self.hash, features=self.features.config(),
                    k=self.card, dim=self.dim, sample_rate=self.sample_rate, frame_rate=self.frame_rate,
                    hop_length=self.hop_length, fit=self.fit_stats)

    def save(self, folder: str | Path) -> Path:
        """Write the folder atomically file by file; the json, written last, marks it complete."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).unlink(missing_ok=True)
        tensors = {"centroids": self.centroids, "mean": self.mean, "std": self.std}
        with atomic_path(folder / WEIGHTS_NAME) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        atomic_write_json(folder / CONFIG_NAME, self.describe())
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "SemanticTokenizer":
        from safetensors.torch import load_file

        folder = Path(str(folder))
        path = folder / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}: fit a semantic tokenizer there with "
                                    f"`ostinato prep semantic SHARDS {folder}`")
        cfg = read_json(path)
        if cfg.get("format") != FORMAT:
            raise ValueError(f"{path}: format {cfg.get('format')!r} is not {FORMAT!r}")
        if not (folder / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{folder / WEIGHTS_NAME} is missing; refit with `ostinato prep semantic`")
        t = load_file(str(folder / WEIGHTS_NAME))
        tok = cls(features_from_config(cfg["features"], origin=f"{path} (features)"), t["centroids"], t["mean"],
                  t["std"], fit=cfg.get("fit"))
        if tok.hash != cfg.get("hash"):
            raise ValueError(f"{folder}: {WEIGHTS_NAME} does not match the hash in {CONFIG_NAME} "
                             f"({tok.hash} != {cfg.get('hash')}); the folder is damaged, refit it")
        return tok.eval()


def token_stats(counts: Tensor) -> dict[str, float]:
    """Histogram [K] of token counts -> used centroids, entropy in bits and perplexity (2 ** entropy)."""
    counts = counts.double()
    p = counts[counts > 0] / counts.sum().clamp_min(1)
    entropy = float(-(p * p.log2()).sum()) if p.numel() else 0.0
    return {"used": int((counts > 0).sum()), "k": int(counts.numel()), "entropy_bits": entropy,
            "max_entropy_bits": math.log2(counts.numel()), "perplexity": 2 ** entropy}
