"""Reconstruction metrics for audio codecs, as torchmetrics ``Metric``s.

All take ``update(pred [B, C, T], target [B, C, T], lengths [B] | None)``; with ``lengths`` only
``x[b, :, :lengths[b]]`` counts for item ``b`` (padding after it, whatever it holds, is ignored). Each item
contributes one value (averaged over its channels); ``compute()`` returns the mean over all items seen, as a 0-dim
fp32 tensor.

States are float64 sums with ``dist_reduce_fx="sum"``, so results are exact item means across DDP ranks and
batches of any size. They stay float64 even when the owning module is cast (``module.to(torch.bfloat16)``, as
Lightning's ``bf16-true`` does; torchmetrics itself would cast them). Spectral transforms run in fp32 with autocast
disabled, and are kept out of the registered modules for the same reason.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchaudio
from torch import Tensor
from torch.nn import Module
from torchmetrics import Metric
from torchmetrics.audio import ScaleInvariantSignalNoiseRatio
from torchmetrics.functional.audio import scale_invariant_signal_noise_ratio

__all__ = ["MelDistance", "MultiScaleSTFTDistance", "SISNR"]


def _check_inputs(pred: Tensor, target: Tensor, lengths: Tensor | None) -> None:
    if pred.dim() != 3 or pred.shape != target.shape:
        raise ValueError(f"expected pred and target [B, C, T] of equal shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    if lengths is not None and (lengths.dim() != 1 or len(lengths) != len(pred)):
        raise ValueError(f"lengths must have shape [{len(pred)}], got {tuple(lengths.shape)}")


def _per_item(
    fn: Callable[[Tensor, Tensor], Tensor], pred: Tensor, target: Tensor, lengths: Tensor | None
) -> Tensor:
    """Apply ``fn([b, C, T'], [b, C, T']) -> [b]`` to each item's valid part, batching items of equal length."""
    if lengths is None:
        return fn(pred, target)
    out = pred.new_empty(len(pred), dtype=torch.float32)
    lengths = lengths.to(pred.device)
    for length in torch.unique(lengths).tolist():
        idx = (lengths == length).nonzero().squeeze(1)
        n = int(min(length, pred.shape[-1]))
        if n <= 0:
            raise ValueError("lengths must be positive")
        out[idx] = fn(pred[idx, :, :n], target[idx, :, :n]).float()
    return out


def _apply_keeping_float64(
    metric: Metric, parent_apply: Callable[..., Module], fn: Callable, exclude_state: Sequence[str],
    keys: Sequence[str],
) -> Module:
    """``Metric._apply`` that moves the float64 states ``keys`` across devices but never changes their dtype.

    torchmetrics casts states on ``module.to(dtype)`` (only ``.half()`` / ``.float()`` etc. are guarded), which
    would turn a float64 running sum into bf16 under Lightning's ``bf16-true``.
    """
    this = parent_apply(fn, tuple(exclude_state) + tuple(keys))
    for key in (k for k in keys if k in this._defaults):
        device = fn(getattr(this, key)).device  # fn may also cast; only its device is taken
        setattr(this, key, getattr(this, key).to(device=device))
        this._defaults[key] = this._defaults[key].to(device=device)
    return this


class _Float64SumMetric(Metric):
    """Mean of per-item values, kept as float64 ``total`` / ``count`` sums."""

    full_state_update = False
    is_differentiable = False
    total: Tensor
    count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _item_values(self, pred: Tensor, target: Tensor) -> Tensor:
        """fp32 ``[b, C, T]`` pairs -> per-item values ``[b]``."""
        raise NotImplementedError

    def update(self, pred: Tensor, target: Tensor, lengths: Tensor | None = None) -> None:
        """``pred, target: [B, C, T]``; ``lengths: [B]`` valid samples per item, or None for all ``T``."""
        _check_inputs(pred, target, lengths)
        with torch.no_grad(), torch.autocast(device_type=pred.device.type, enabled=False):
            values = _per_item(self._item_values, pred.detach().float(), target.detach().float(), lengths)
        self.total += values.double().sum()
        self.count += len(values)

    def compute(self) -> Tensor:
        return (self.total / self.count).float()

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = ()) -> Module:
        return _apply_keeping_float64(self, super()._apply, fn, exclude_state, ("total", "count"))


class MelDistance(_Float64SumMetric):
    """Mean L1 distance between log10 mel magnitude spectrograms.

    Per item: ``mean |log10(max(M(pred), floor)) - log10(max(M(target), floor))|`` over channels, mel bands and
    frames, where ``M`` is a torchaudio ``MelSpectrogram`` with ``power=1`` (magnitude), Hann window,
    ``center=True``. Units: log10 of magnitude (multiply by 20 for dB). Lower is better; 0 for identical signals.
    Items must be longer than ``n_fft // 2`` samples (reflect padding).
    """

    higher_is_better = False

    def __init__(
        self,
        sample_rate: int,
        n_mels: int = 80,
        n_fft: int = 1024,
        hop_length: int = 256,
        f_min: float = 0.0,
        f_max: float | None = None,
        floor: float = 1e-5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.floor = floor
        with torch.device("cpu"):  # no meta kernel for its filterbank; _item_values moves it to the audio's device
            self._mel = [
                torchaudio.transforms.MelSpectrogram(
                    sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, f_min=f_min, f_max=f_max,
                    n_mels=n_mels, power=1.0, window_fn=torch.hann_window,
                )
            ]

    def _item_values(self, pred: Tensor, target: Tensor) -> Tensor:
        mel = self._mel[0]
        if mel.mel_scale.fb.device != pred.device:
            mel.to(pred.device)
        lp = torch.log10(mel(pred).clamp_min(self.floor))
        lt = torch.log10(mel(target).clamp_min(self.floor))
        return (lp - lt).abs().flatten(1).mean(1)


class MultiScaleSTFTDistance(_Float64SumMetric):
    """Mean over STFT scales of the L1 distance between log10 magnitude spectrograms.

    Per item and scale ``n_fft``: ``mean |log10(max(|S(pred)|, floor)) - log10(max(|S(target)|, floor))|`` with a
    Hann window of ``n_fft`` samples, hop ``n_fft * hop_ratio``, ``center=True``; then averaged over scales. Units:
    log10 of magnitude. Lower is better. Items must be longer than ``max(n_ffts) // 2`` samples.
    """

    higher_is_better = False

    def __init__(
        self, n_ffts: Sequence[int] = (2048, 1024, 512, 256), hop_ratio: float = 0.25, floor: float = 1e-5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.n_ffts = tuple(n_ffts)
        self.hop_ratio = hop_ratio
        self.floor = floor

    def _item_values(self, pred: Tensor, target: Tensor) -> Tensor:
        b, c, t = pred.shape
        both = torch.cat([pred, target]).reshape(2 * b * c, t)
        per_scale = []
        for n_fft in self.n_ffts:
            window = torch.hann_window(n_fft, device=pred.device)
            spec = torch.stft(both, n_fft, hop_length=max(int(n_fft * self.hop_ratio), 1), window=window,
                              return_complex=True)
            logmag = torch.log10(spec.abs().clamp_min(self.floor)).reshape(2, b, -1)
            per_scale.append((logmag[0] - logmag[1]).abs().mean(1))
        return torch.stack(per_scale).mean(0)


class SISNR(ScaleInvariantSignalNoiseRatio):
    """Scale-invariant signal-to-noise ratio in dB (torchmetrics' ``ScaleInvariantSignalNoiseRatio``, zero-mean).

    Extends the torchmetrics metric with ``[B, C, T]`` inputs and ``lengths``: each item's value is the mean of
    its channels' SI-SNR over the valid samples, and ``compute()`` is the mean over items (fp32, dB). Higher is
    better. The parent's state ``sum_si_snr`` is made float64 and ``total`` counts items.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("sum_si_snr", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, lengths: Tensor | None = None) -> None:  # type: ignore[override]
        """``preds, target: [B, C, T]``; ``lengths: [B]`` valid samples per item, or None."""
        _check_inputs(preds, target, lengths)
        with torch.no_grad(), torch.autocast(device_type=preds.device.type, enabled=False):
            values = _per_item(
                lambda p, t: scale_invariant_signal_noise_ratio(p, t).mean(1),
                preds.detach().float(), target.detach().float(), lengths,
            )
        self.sum_si_snr += values.double().sum()
        self.total += len(values)

    def compute(self) -> Tensor:
        return (self.sum_si_snr / self.total).float()

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = ()) -> Module:
        return _apply_keeping_float64(self, super()._apply, fn, exclude_state, ("sum_si_snr",))
