"""Audio out of a trained Musika: any length, many windows generated in parallel and stitched.

A piece gets one style vector and one chain of coordinate anchors; window ``i`` covers coordinate steps
``[i L, (i + 1) L)`` of that field (``L`` = the family's coarse window). Windows are generated in batches of
``batch_windows`` with the generator's halo and cropped, which makes them exactly the corresponding parts of the
whole field (``MusikaGenerator`` is translation-equivariant), so the concatenation has no seams. The latents are
decoded by the autoencoder in overlapping chunks (``SpectralAutoencoder.decode_chunked``).

``ostinato generate --family musika --model REF --duration 600 --seed 0 --out gen/musika``
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ostinato.generation.request import GenerationRequest
from ostinato.models.musika import SpectralAutoencoder, truncated_normal, window_coordinates

__all__ = ["MusikaParams", "generate_latents", "generate_audio", "load_autoencoder", "load_musika", "generate_clips",
           "spectral_flux", "seam_statistics"]

Progress = Callable[[int, int], None]


@dataclass
class MusikaParams:
    """Sampling settings.

    Attributes:
        truncation: anchors and style are drawn from a normal truncated at +-truncation (Musika's default 2; None:
            untruncated). Lower values give more typical, less varied music.
        seed: seeds a private generator (same seed, same audio); None uses the global RNG.
        batch_windows: windows per generator forward.
        decode_chunk: latent frames per autoencoder decoding chunk.
    """

    truncation: float | None = 2.0
    seed: int | None = None
    batch_windows: int = 64
    decode_chunk: int = 512


def _rng(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(int(seed))


@torch.no_grad()
def generate_latents(family: Any, n_frames: int, batch: int = 1, params: MusikaParams | None = None,
                     progress: Progress | None = None, independent_windows: bool = False) -> Tensor:
    """``[batch, D, n_frames]`` latents from a ``MusikaFamily`` (its generator, EMA weights when exported).

    ``independent_windows``: every window gets its own anchors and style, as if generated separately; this breaks
    the continuity across joins and exists to show what the shared coordinate field buys (tests, diagnostics).
    """
    params = params or MusikaParams()
    g = family.generator
    device = next(g.parameters()).device
    h, length, spacing = g.halo, family.coarse_window, family.anchor_spacing
    n_windows = max(1, math.ceil(n_frames / family.window))
    rng = _rng(params.seed)
    if independent_windows:
        span = length + 2 * h
        style = truncated_normal((batch * n_windows, g.style_dim), params.truncation, rng)
        anchors = truncated_normal((batch * n_windows, span // spacing + 3, g.coord_dim), params.truncation, rng)
        coords = torch.cat([window_coordinates(a.T[None], spacing, [h], length, h) for a in anchors])
    else:  # style first, then the anchors in time order: a shorter piece is the start of a longer one
        n_anchors = (n_windows * length + 2 * h) // spacing + 2
        style = truncated_normal((batch, g.style_dim), params.truncation, rng).repeat_interleave(n_windows, dim=0)
        anchors = truncated_normal((batch, n_anchors, g.coord_dim), params.truncation, rng).transpose(1, 2)
        coords = window_coordinates(anchors, spacing, [h + i * length for i in range(n_windows)], length, h)
    was_training = g.training
    g.eval()
    try:
        outs = []
        step = max(1, int(params.batch_windows))
        for s in range(0, coords.shape[0], step):
            outs.append(g.windows(coords[s:s + step].to(device), style[s:s + step].to(device)))
            if progress is not None:
                progress(min(s + step, coords.shape[0]), coords.shape[0])
    finally:
        g.train(was_training)
    windows = torch.cat(outs).view(batch, n_windows, g.dimension, family.window)
    return windows.permute(0, 2, 1, 3).reshape(batch, g.dimension, n_windows * family.window)[..., :n_frames]


@torch.no_grad()
def generate_audio(family: Any, autoencoder: SpectralAutoencoder, seconds: float, batch: int = 1,
                   params: MusikaParams | None = None, progress: Progress | None = None,
                   independent_windows: bool = False) -> Tensor:
    """``[batch, C, round(seconds * sample_rate)]`` waveforms; ``progress(done, total)`` covers both the latent
    windows and the decoding chunks."""
    params = params or MusikaParams()
    frame_rate = autoencoder.frame_rate
    if family.frame_rate and abs(family.frame_rate - frame_rate) > 1e-6:
        raise ValueError(f"the GAN was trained on latents at {family.frame_rate:g} Hz but the autoencoder's are at "
                         f"{frame_rate:g} Hz; pass the autoencoder it was trained with (--codec)")
    n_frames = math.ceil(seconds * frame_rate)
    n_windows = max(1, math.ceil(n_frames / family.window)) * batch
    n_chunks = math.ceil(n_frames / params.decode_chunk)
    total = n_windows + n_chunks

    def on_windows(done: int, _: int) -> None:
        if progress is not None:
            progress(done, total)

    def on_chunk(done: int, _: int) -> None:
        if progress is not None:
            progress(n_windows + math.ceil(done / params.decode_chunk), total)

    latents = generate_latents(family, n_frames, batch, params, on_windows, independent_windows)
    device = next(autoencoder.parameters()).device
    wav = autoencoder.decode_chunked(latents.to(device), params.decode_chunk, progress=on_chunk)
    return wav[..., :round(seconds * autoencoder.sample_rate)]


def spectral_flux(wav: Tensor, sample_rate: int, n_fft: int = 4096, hop: int = 1024, n_mels: int = 16,
                  range_db: float = 60.0) -> Tensor:
    """Spectral flux of a mono mix ``wav [C, T]``: per frame t (Hann, centred), the mean absolute difference of
    log mel-band energies between frames t - 1 and t, energies floored ``range_db`` below the loudest band:
    ``[frames]`` (frame 0 gets 0). Few wide bands measure changes of the spectral envelope, not of fine structure."""
    import torchaudio

    x = wav.detach().float().mean(dim=0)
    mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=n_fft, hop_length=hop, n_mels=n_mels,
                                               power=2.0).to(x.device)(x)
    logmel = torch.log(mel + float(mel.max()) * 10 ** (-range_db / 10) + 1e-20)
    flux = (logmel[:, 1:] - logmel[:, :-1]).abs().mean(dim=0)
    return torch.cat([flux.new_zeros(1), flux])


def seam_statistics(wav: Tensor, sample_rate: int, joint_samples: int, phase_samples: int | None = None,
                    hop: int = 1024, n_mels: int = 16) -> dict[str, float]:
    """Is the spectral flux at window joints (every ``joint_samples`` samples) like the flux inside windows?

    The statistic at a position is the largest flux of the frames whose windows (``n_fft = 4 hop``) can see it.
    It is taken at every joint and, as the reference, at the positions inside windows that sit at the same phase
    of the models' frame grids (multiples of ``phase_samples``: the generator's upsampling times the autoencoder's
    hop) and are not next to a joint; ``hop`` is adjusted to divide ``phase_samples`` so both sets sit at the same
    phase of the STFT grid too. Returns the reference's 99th percentile, the share of joints above it (about 1 %
    when joints are like the inside), the medians, and the two-sample Kolmogorov-Smirnov statistic and p-value.
    """
    from scipy.stats import ks_2samp

    period = phase_samples or hop
    hop = period // max(1, round(period / hop))
    n_fft = 4 * hop
    flux = spectral_flux(wav, sample_rate, n_fft, hop, n_mels).double()
    reach = n_fft // hop // 2 + 1
    local = torch.nn.functional.max_pool1d(flux[None, None], 2 * reach + 1, stride=1, padding=reach)[0, 0]
    frames, total = flux.shape[0], wav.shape[-1]
    joints = torch.arange(joint_samples, total - joint_samples // 2, joint_samples)
    positions = torch.arange(period, total - period // 2, period)
    positions = positions[positions % joint_samples != 0]
    if joints.numel():
        positions = positions[(positions[:, None] - joints[None, :]).abs().min(dim=1).values > 2 * reach * hop]

    def frames_of(samples: Tensor) -> Tensor:
        f = torch.round(samples.double() / hop).long()
        return f[(f >= 2 * reach) & (f < frames - 2 * reach)]

    at_joints, inside = local[frames_of(joints)], local[frames_of(positions)]
    if at_joints.numel() < 2 or inside.numel() < 2:
        raise ValueError(f"{total / sample_rate:g} s hold {at_joints.numel()} joints and {inside.numel()} reference "
                         "positions: generate more windows")
    p99 = float(torch.quantile(inside, 0.99))
    ks = ks_2samp(at_joints.numpy(), inside.numpy())
    return {"joints": int(at_joints.numel()), "inside": int(inside.numel()), "inside_p99": p99,
            "joints_above_p99": float((at_joints > p99).double().mean()),
            "joint_median": float(at_joints.median()), "inside_median": float(inside.median()),
            "ks_statistic": float(ks.statistic), "ks_pvalue": float(ks.pvalue), "hop": hop}


def load_autoencoder(ref: str, trust: bool = False) -> SpectralAutoencoder:
    """The ``SpectralAutoencoder`` of a Musika autoencoder (XP signature, //sig/SIG, XP folder, .ckpt, export)."""
    import ostinato
    from ostinato.store.records import resolve_ref, xps_dir

    module = ostinato.load(resolve_ref(str(ref)), xps_dir=xps_dir(), trust=trust)
    ae = getattr(module, "autoencoder", None)
    if not isinstance(ae, SpectralAutoencoder):
        raise ValueError(f"{ref} holds a {type(module).__name__}, not a Musika autoencoder (family "
                         "musika_autoencoder_*)")
    return ae.eval()


def load_musika(model: str, autoencoder: str | None = None, trust: bool = False) -> tuple[Any, SpectralAutoencoder,
                                                                                          str]:
    """A trained ``MusikaFamily`` and its autoencoder -> ``(family in eval mode, autoencoder, autoencoder ref)``.

    The autoencoder is ``autoencoder`` if given, else ``family.autoencoder`` of the stored config, else the one
    recorded in the training array shards' manifest.
    """
    import ostinato
    from ostinato.store.records import read_weights
    from ostinato.families.musika import MusikaFamily
    from ostinato.store.records import require_ref, xps_dir

    ref = require_ref(str(model), "--model", "a Musika GAN: an XP folder, a checkpoint or an export folder")
    family = ostinato.load(ref, xps_dir=xps_dir(), trust=trust)
    if not isinstance(family, MusikaFamily):
        raise ValueError(f"{model} holds a {type(family).__name__}, not a Musika GAN (family musika_*); "
                         "--family musika generates with the latent GAN, whose autoencoder decodes")
    _, cfg, _ = read_weights(ref, xps_dir(), trust)
    cfg = cfg or {}
    ae_ref = autoencoder or (cfg.get("family") or {}).get("autoencoder")
    if ae_ref is None:
        from ostinato.data.arrays import ArrayManifest

        train = (cfg.get("data") or {}).get("train")
        if train is None:
            raise ValueError(f"{model}: no autoencoder recorded (family.autoencoder or array shards); pass --codec")
        ae_ref = ArrayManifest.load(train).model.id
    return family.eval(), load_autoencoder(ae_ref, trust), str(ae_ref)


def generate_clips(request: GenerationRequest, progress: Progress) -> tuple[Tensor, int, list[dict[str, Any]]]:
    """``ostinato generate --model MUSIKA``: one clip of ``duration`` seconds per run (``seed``)."""
    if any(request.prompts) or request.melody or request.style or request.continuation:
        raise ValueError("Musika is unconditional: drop --prompt / --prompts / --melody / --style / --continue")
    family, ae, ae_ref = load_musika(request.model, request.codec, trust=request.trust)
    truncation = 2.0 if request.truncation is None else request.truncation  # Musika's default
    if truncation < 0:
        raise ValueError(f"--truncation {truncation}: give a bound > 0, or 0 for an untruncated normal")
    params = MusikaParams(truncation=truncation or None, seed=request.params.seed)
    t0 = time.perf_counter()
    wav = generate_audio(family, ae, request.duration, params=params, progress=progress)
    elapsed = time.perf_counter() - t0
    record = {"family": "musika", "model": request.model, "autoencoder": ae_ref, "duration": request.duration,
              "seconds_per_second": round(request.duration / max(elapsed, 1e-9), 2), **params.__dict__}
    return wav, ae.sample_rate, [record]
