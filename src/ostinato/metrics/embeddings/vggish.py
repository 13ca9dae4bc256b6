"""VGGish (Hershey et al., ICASSP 2017) with weights in torchvggish's state-dict format, log-mel framing in torch.

Framing (tensorflow/models research/audioset/vggish: ``vggish_params.py``, ``mel_features.py``, ``vggish_input.py``):
16 kHz mono; frames of 400 samples (25 ms) every 160 (10 ms), no centering or padding, so a clip of T samples has
``1 + (T - 400) // 160`` frames; periodic Hann window; |rfft| with 512 points (257 bins); 64 triangular mel bands
from 125 to 7500 Hz whose edges are evenly spaced on the HTK mel scale (1127 ln(1 + f / 700)) and whose slopes are
linear *in mel*, the DC bin weighted 0, no area normalisation; ``log(mel + 0.01)``; examples of 96 frames (0.96 s)
every 96 frames, a partial last example dropped. torchaudio's ``MelSpectrogram`` does not reproduce this: with
``win_length < n_fft`` it frames 512 samples (fewer frames, offset by 56 samples) and its triangles are linear in Hz.

Network (harritaylor/torchvggish ``vggish.py``): ``features`` = conv3x3 64, pool, 128, pool, 256, 256, pool, 512,
512, pool (parameters ``features.{0,3,6,8,11,13}.weight/bias``), flattened in TF's NHWC order, then ``embeddings``
= Linear 12288->4096, ReLU, 4096->4096, ReLU, 4096->128, ReLU (``embeddings.{0,2,4}.weight/bias``). The released
file is ``vggish-10086976.pth``; the PCA file ``vggish_pca_params-970ea276.pth`` holds ``pca_eigen_vectors``
[128, 128] and ``pca_means`` [128] (Google's ``vggish_pca_params.npz`` has the same keys).

Default output: raw 128-d embeddings of the last Linear, without its ReLU and without PCA, as fadtk's
``VGGishModel`` (``use_pca=False, use_activation=False``) and Google's FAD use. ``activation=True`` keeps the
ReLU (torchvggish's ``postprocess=False`` output); ``pca=`` adds AudioSet's PCA-whitening and, unless
``quantize=False``, its 8-bit quantisation (clip to [-2, 2], map to 0..255), torchvggish's ``Postprocessor``.
Input is resampled with ``ostinato.data.audio.resample`` (the original uses resampy).
"""
from __future__ import annotations

import hashlib
import importlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ostinato.metrics.embeddings.base import EmbeddingBackend, as_bool

VERSION = 1  # bump when what ``_embed`` computes changes: invalidates cached statistics

SAMPLE_RATE = 16_000
STFT_WINDOW = 400  # 25 ms
STFT_HOP = 160  # 10 ms
FFT_SIZE = 512  # next power of two of the window
NUM_MELS = 64
MEL_MIN_HZ = 125.0
MEL_MAX_HZ = 7500.0
LOG_OFFSET = 0.01
EXAMPLE_FRAMES = 96  # 0.96 s per example, hop = window (no overlap)
EMBEDDING_SIZE = 128
QUANTIZE_MIN, QUANTIZE_MAX = -2.0, 2.0
CONV_CHANNELS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M")
# numpy globals that a torch-pickled PCA file may hold (torchvggish's release stores numpy arrays).
_NUMPY_GLOBALS = ("numpy.dtype", "numpy.ndarray", "numpy._core.multiarray._reconstruct",
                  "numpy.core.multiarray._reconstruct", "numpy.dtypes.Float32DType", "numpy.dtypes.Float64DType")


def hz_to_mel(hz: Tensor | float) -> Tensor:
    """HTK mel scale: 1127 ln(1 + f / 700)."""
    return 1127.0 * torch.log1p(torch.as_tensor(hz, dtype=torch.float64) / 700.0)


@lru_cache(maxsize=1)
def mel_matrix() -> Tensor:
    """[257, 64] float64 weights with ``mel = |rfft| @ mel_matrix()`` (``spectrogram_to_mel_matrix``)."""
    bins_mel = hz_to_mel(torch.linspace(0.0, SAMPLE_RATE / 2, FFT_SIZE // 2 + 1, dtype=torch.float64))
    edges = torch.linspace(float(hz_to_mel(MEL_MIN_HZ)), float(hz_to_mel(MEL_MAX_HZ)), NUM_MELS + 2,
                           dtype=torch.float64)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins_mel[:, None] - lower) / (center - lower)
    falling = (upper - bins_mel[:, None]) / (upper - center)
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)
    weights[0] = 0.0  # HTK leaves out the DC bin
    return weights


def num_frames(num_samples: int) -> int:
    """STFT frames of a clip of ``num_samples`` samples at 16 kHz: 1 + (T - 400) // 160, 0 below 400."""
    return 0 if num_samples < STFT_WINDOW else 1 + (num_samples - STFT_WINDOW) // STFT_HOP


def num_examples(num_samples: int) -> int:
    """0.96 s examples (embeddings) of a clip of ``num_samples`` samples at 16 kHz."""
    return num_frames(num_samples) // EXAMPLE_FRAMES


def log_mel(wav: Tensor) -> Tensor:
    """wav [B, T] at 16 kHz -> log-mel [B, N, 64] float64 with N = ``num_frames(T)``."""
    n = num_frames(wav.shape[-1])
    if n == 0:
        return wav.new_zeros(wav.shape[0], 0, NUM_MELS, dtype=torch.float64)
    frames = wav.double()[..., : STFT_WINDOW + (n - 1) * STFT_HOP].unfold(-1, STFT_WINDOW, STFT_HOP)
    window = torch.hann_window(STFT_WINDOW, periodic=True, dtype=torch.float64, device=wav.device)
    magnitude = torch.fft.rfft(frames * window, n=FFT_SIZE).abs()  # [B, N, 257]
    return torch.log(magnitude @ mel_matrix().to(wav.device) + LOG_OFFSET)


def examples(mel: Tensor) -> Tensor:
    """log-mel [B, N, 64] -> examples [B, N // 96, 96, 64] (non-overlapping, a partial tail dropped)."""
    count = mel.shape[1] // EXAMPLE_FRAMES
    return mel[:, : count * EXAMPLE_FRAMES].reshape(mel.shape[0], count, EXAMPLE_FRAMES, NUM_MELS)


class VGGish(nn.Module):
    """The VGGish network with torchvggish's parameter names. examples [N, 1, 96, 64] -> [N, 128]."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for v in CONV_CHANNELS:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1), nn.ReLU()]
                channels = int(v)
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(nn.Linear(512 * 4 * 6, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                                        nn.Linear(4096, EMBEDDING_SIZE), nn.ReLU())

    def forward(self, x: Tensor, activation: bool = False) -> Tensor:
        x = self.features(x)  # [N, 512, 6, 4]
        x = x.permute(0, 2, 3, 1).flatten(1)  # TF's NHWC flatten order, which the converted weights expect
        return (self.embeddings if activation else self.embeddings[:-1])(x)


def load_vggish(path: str | Path) -> VGGish:
    """A ``VGGish`` with the weights of a torchvggish state-dict file (e.g. ``vggish-10086976.pth``), strictly."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no VGGish weights at {path}: give a local torchvggish state dict "
                                "(vggish-10086976.pth); weights are never downloaded")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    with torch.device("meta"):
        model = VGGish()
    try:
        model.load_state_dict({k: torch.as_tensor(v).float() for k, v in state.items()}, strict=True, assign=True)
    except (RuntimeError, AttributeError) as e:
        raise ValueError(f"{path} is not a torchvggish state dict (expected features.{{0,3,6,8,11,13}}.weight/bias "
                         f"and embeddings.{{0,2,4}}.weight/bias): {' '.join(str(e).split())}") from e
    return model.eval().requires_grad_(False)


def load_pca(path: str | Path) -> tuple[Tensor, Tensor]:
    """(eigen_vectors [128, 128], means [128]) float32 from torchvggish's ``.pth`` or Google's ``.npz``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no VGGish PCA parameters at {path}: give vggish_pca_params-970ea276.pth or "
                                "vggish_pca_params.npz")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            params = {k: f[k] for k in f.files}
    else:
        allowed = [_resolve(name) for name in _NUMPY_GLOBALS]
        with torch.serialization.safe_globals([g for g in allowed if g is not None]):
            params = torch.load(path, map_location="cpu", weights_only=True)
    try:
        vectors = torch.as_tensor(np.asarray(params["pca_eigen_vectors"]), dtype=torch.float32)
        means = torch.as_tensor(np.asarray(params["pca_means"]), dtype=torch.float32).reshape(-1)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path} lacks pca_eigen_vectors / pca_means (torchvggish's PCA file format)") from e
    if vectors.shape != (EMBEDDING_SIZE, EMBEDDING_SIZE) or means.shape != (EMBEDDING_SIZE,):
        raise ValueError(f"{path}: expected pca_eigen_vectors [128, 128] and pca_means [128], got "
                         f"{tuple(vectors.shape)} and {tuple(means.shape)}")
    return vectors, means


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """Short sha256 of a file's bytes, remembered per (path, size, mtime) since the weights are 288 MB."""
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        with open(path, "rb") as f:
            _FILE_HASHES[key] = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    return _FILE_HASHES[key]


def _resolve(qualname: str) -> Any:
    module, _, attr = qualname.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


class VGGishBackend(EmbeddingBackend):
    """One 128-d embedding per 0.96 s of 16 kHz mono audio; clips under 0.975 s give no frames.

    Args:
        path: torchvggish state dict (``vggish-10086976.pth``).
        pca: optional PCA parameters file; applies AudioSet's PCA-whitening.
        quantize: with ``pca``, quantise to 8 bits (0..255) like the released AudioSet embeddings.
        activation: keep the ReLU after the last Linear (torchvggish's raw output); off by default (fadtk).
    """

    name = "vggish"
    sample_rate = SAMPLE_RATE
    channels = 1
    dim = EMBEDDING_SIZE
    window_seconds = ((EXAMPLE_FRAMES - 1) * STFT_HOP + STFT_WINDOW) / SAMPLE_RATE
    hop_seconds = EXAMPLE_FRAMES * STFT_HOP / SAMPLE_RATE

    def __init__(self, path: str | Path, pca: str | Path | None = None, quantize: bool | int | str = True,
                 activation: bool | int | str = False, chunk: int = 256) -> None:
        self.source = str(Path(path).expanduser().resolve())
        self.model = self.net = load_vggish(path)
        self.activation = as_bool(activation)
        self.pca_source = str(Path(pca).expanduser().resolve()) if pca else None
        self.pca = load_pca(pca) if pca else None
        self.quantize = as_bool(quantize) if pca else False
        self.chunk = int(chunk)
        self.weights = file_sha256(self.source)
        self.pca_hash = file_sha256(self.pca_source) if self.pca_source else None

    def _identity(self) -> dict[str, Any]:
        return {"version": VERSION, "source": self.source, "weights": self.weights, "activation": self.activation,
                "pca": self.pca_source, "pca_weights": self.pca_hash, "quantize": self.quantize}

    def _embed(self, wav: Tensor) -> list[Tensor]:
        ex = examples(log_mel(wav[:, 0]))  # [B, E, 96, 64]
        b, e = ex.shape[:2]
        flat = ex.reshape(b * e, 1, EXAMPLE_FRAMES, NUM_MELS).float()
        out = [self.net(flat[i:i + self.chunk], activation=self.activation)
               for i in range(0, flat.shape[0], self.chunk)]
        emb = torch.cat(out) if out else flat.new_zeros(0, EMBEDDING_SIZE)
        if self.pca is not None:
            emb = self._postprocess(emb)
        return list(emb.reshape(b, e, EMBEDDING_SIZE).unbind(0))

    def _postprocess(self, emb: Tensor) -> Tensor:
        vectors, means = (t.to(emb.device) for t in self.pca)
        emb = (emb - means) @ vectors.T
        if not self.quantize:
            return emb
        scale = 255.0 / (QUANTIZE_MAX - QUANTIZE_MIN)
        return torch.round((emb.clamp(QUANTIZE_MIN, QUANTIZE_MAX) - QUANTIZE_MIN) * scale)
