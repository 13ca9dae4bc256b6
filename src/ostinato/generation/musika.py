"""Audio out of a trained Musika: ``ostinato generate`` / ``eval`` load the GAN and its autoencoder
(``load_musika``) and call ``Musika.generate`` (``ostinato.models.musika``: any length, many windows generated in
parallel and stitched without seams); ``spectral_flux`` and ``seam_statistics`` measure the joins.

``ostinato generate --model REF --seconds 600 --seed 0 --out gen/musika``
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor

from ostinato.generation.request import GenerationRequest
from ostinato.metrics.diversity import diversity_report
from ostinato.models.musika import Musika, SpectralAutoencoder
from ostinato.nn.decoding import Progress

__all__ = ["load_autoencoder", "load_musika", "generate_clips", "spectral_flux", "seam_statistics", "seed_diversity",
           "autoencoder_diversity"]



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

    ae = ostinato.load(resolve_ref(str(ref)), xps_dir=xps_dir(), trust=trust)
    if not isinstance(ae, SpectralAutoencoder):
        raise ValueError(f"{ref} holds a {type(ae).__name__}, not a Musika autoencoder (family "
                         "musika_autoencoder_*)")
    return ae.eval()


def load_musika(model: str, autoencoder: str | None = None, trust: bool = False) -> tuple[Musika, SpectralAutoencoder,
                                                                                          str]:
    """A trained Musika GAN with its autoencoder attached -> ``(model in eval mode, autoencoder, autoencoder ref)``.

    The autoencoder is ``autoencoder`` if given, else the one its record names (``recorded_autoencoder``).
    """
    import ostinato
    from ostinato.store.records import require_ref, xps_dir

    ref = require_ref(str(model), "--model", "a Musika GAN: an XP folder, a checkpoint or an export folder")
    gan = ostinato.load(ref, xps_dir=xps_dir(), trust=trust)
    if not isinstance(gan, Musika):
        raise ValueError(f"{model} holds a {type(gan).__name__}, not a Musika GAN (family musika_*); "
                         "--family musika generates with the latent GAN, whose autoencoder decodes")
    ae_ref = autoencoder or gan.autoencoder_ref
    if ae_ref is None:
        raise ValueError(f"{model}: no autoencoder recorded (family.autoencoder or array shards); pass --codec")
    gan.attach(load_autoencoder(ae_ref, trust), str(ae_ref))
    return gan.eval(), gan.autoencoder, str(ae_ref)


def generate_clips(request: GenerationRequest, progress: Progress) -> tuple[Tensor, int, list[dict[str, Any]]]:
    """``ostinato generate --model MUSIKA``: one clip of ``duration`` seconds per run (``seed``)."""
    if any(request.prompts) or request.melody or request.style or request.continuation:
        raise ValueError("Musika is unconditional: drop --prompt / --prompts / --melody / --style / --continue")
    gan, ae, ae_ref = load_musika(request.model, request.codec, trust=request.trust)
    truncation = 2.0 if request.truncation is None else request.truncation  # Musika's default
    if truncation < 0:
        raise ValueError(f"--truncation {truncation}: give a bound > 0, or 0 for an untruncated normal")
    seed = request.params.seed
    t0 = time.perf_counter()
    wav = gan.generate(request.duration, truncation=truncation or None, seed=seed, progress=progress)
    elapsed = time.perf_counter() - t0
    record = {"family": "musika", "model": request.model, "autoencoder": ae_ref, "duration": request.duration,
              "seconds_per_second": round(request.duration / max(elapsed, 1e-9), 2), "truncation": truncation or None,
              "seed": seed}
    return wav, ae.sample_rate, [record]


@torch.no_grad()
def seed_diversity(model: Musika | str, seeds: int = 8, seconds: float = 5.0, truncation: float | None = 2.0,
                   first_seed: int = 0, reference: Tensor | None = None,
                   tight_truncation: float = 0.5) -> dict[str, Any]:
    """Do Musika's generations depend on their seed? ``model`` (a ``Musika`` with its autoencoder, or anything
    ``load_musika`` takes) writes one ``seconds``-long clip per seed ``first_seed .. first_seed + seeds - 1``, each
    as ``ostinato generate --seed S`` would.

    Returns ``{"seeds": ..., "latents": ..., "truncation": ..., "reference": ...}``:

    * ``seeds``: mean / max waveform correlation and log-mel cosine over the pairs (a collapsed GAN: all near 1);
    * ``latents``: ``std_over_seeds``, the generator's latents' std across seeds (averaged over channels and
      frames), ``abs_mean`` their mean absolute value and, with ``reference``, ``std_real`` the same std across
      the reference clips' latents: a std far below the real one is the collapse, whatever the autoencoder does;
    * ``truncation``: the same seed at two bounds (a generator that ignores its noise: near 1);
    * ``reference`` (when ``reference`` clips ``[N, C, T]`` at the autoencoder's rate are given): the diversity of
      their autoencoder reconstructions, the ceiling the GAN's clips can reach through this autoencoder.
    """
    gan = load_musika(model)[0] if isinstance(model, str) else model
    ae = gan.autoencoder
    clips = torch.cat([gan.generate(seconds, truncation=truncation, seed=first_seed + i).cpu()
                       for i in range(seeds)])
    n_frames = math.ceil(seconds * ae.frame_rate)
    latents = torch.cat([gan.latents(n_frames, truncation=truncation, seed=first_seed + i).cpu()
                         for i in range(seeds)])  # [seeds, D, frames]
    tight = gan.generate(seconds, truncation=tight_truncation, seed=first_seed).cpu()
    out: dict[str, Any] = {
        "seeds": diversity_report(clips, ae.sample_rate),
        "latents": {"std_over_seeds": float(latents.std(dim=0).mean()), "abs_mean": float(latents.abs().mean())},
        "truncation": {"bounds": [truncation, tight_truncation],
                       **diversity_report(torch.cat([clips[:1], tight]), ae.sample_rate)},
    }
    if reference is not None:
        device = next(ae.parameters()).device
        real = torch.cat([ae.encode(clip[None].to(device)).cpu() for clip in reference])
        recon = torch.cat([ae.decode(z[None].to(device)).cpu() for z in real])
        out["reference"] = diversity_report(recon[..., :reference.shape[-1]], ae.sample_rate)
        out["latents"]["std_real"] = float(real.std(dim=0).mean())
    return out


def _centred_cosines(x: Tensor) -> Tensor:
    """x [N, ...] -> mean cosine over the N(N-1)/2 pairs of rows, each row's mean removed."""
    x = x.flatten(1).double()
    x = x - x.mean(1, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    pairs = torch.triu_indices(x.shape[0], x.shape[0], offset=1)
    return (x @ x.T)[pairs[0], pairs[1]].mean()


@torch.no_grad()
def autoencoder_diversity(autoencoder: SpectralAutoencoder, clips: Tensor) -> dict[str, float]:
    """Does a Musika autoencoder keep different clips apart? ``clips [N, C, T]`` (N >= 2, different pieces, at
    its rate) go through it once.

    Returns, beside ``diversity_report`` of the reconstructions (``recon_*``) and of the clips (``real_*``):

    * ``logmag_cos`` / ``target_cos``: the mean centred cosine between clips of the decoder's log-magnitudes and
      of the input's, natural (not normalised: the same for any normalisation; a decoder that ignores its latents:
      ``logmag_cos`` near 1);
    * ``spec_l1`` (decoded vs input log-magnitudes, normalised as the model's loss sees them), against
      ``spec_l1_constant`` (the per-bin median over all clips and frames: one spectrum for everything) and
      ``spec_l1_clip`` (each clip's own per-bin median), both
      fitted to these very clips (oracles: a young decoder can lie above them and still tell clips apart, which
      the cosines show);
    * ``latent_spread`` (std across clips, mean over dimensions and frames) and ``latent_centre`` (mean |mean|
      per dimension): latents that are mostly their centre carry little of the clip.
    """
    if clips.dim() != 3 or clips.shape[0] < 2:
        raise ValueError(f"autoencoder_diversity needs clips [N >= 2, C, T], got {tuple(clips.shape)}")
    device = next(autoencoder.parameters()).device
    was_training = autoencoder.training
    try:  # a training forward would fit an unfitted model's normalisation to these clips
        out = autoencoder.eval()(clips.to(device))
    finally:
        autoencoder.train(was_training)
    target, logmag = out.target.float().cpu(), out.logmag.float().cpu()
    natural = {"logmag": autoencoder.denormalise(out.logmag).float().cpu(),
               "target": autoencoder.denormalise(out.target).float().cpu()}
    constant = target.median(dim=2, keepdim=True).values.median(dim=0, keepdim=True).values
    own = target.median(dim=2, keepdim=True).values
    z = out.latents.float().cpu()
    report = {f"recon_{k}": v for k, v in diversity_report(out.recon.cpu(), autoencoder.sample_rate).items()
              if k != "pairs"}
    report.update({f"real_{k}": v for k, v in diversity_report(clips.cpu(), autoencoder.sample_rate).items()
                   if k != "pairs"})
    report.update(logmag_cos=float(_centred_cosines(natural["logmag"])),
                  target_cos=float(_centred_cosines(natural["target"])),
                  spec_l1=float((logmag - target).abs().mean()),
                  spec_l1_constant=float((constant - target).abs().mean()),
                  spec_l1_clip=float((own - target).abs().mean()),
                  latent_spread=float(z.std(dim=0).mean()), latent_centre=float(z.mean(dim=(0, 2)).abs().mean()))
    return report
