"""Activation observers: watch a tensor over the calibration batches, then give its (scale, zero point).

Methods (per-tensor asymmetric, `bits` 8 or 4; qparams as torch/TFLite compute them:
scale = (max(rmax, 0) - min(rmin, 0)) / (qmax - qmin), zero_point = qmin - round(min(rmin, 0) / scale)):
  minmax          torchao's MinMaxObserver: the running min and max over all batches.
  moving_average  torchao's MovingAverageMinMaxObserver: min/max per batch, exponentially averaged
                  (averaging constant 0.1, so a few dozen batches matter; the torch default 0.01 barely
                  moves off the first batch at calibration sizes of a few hundred images).
  percentile      written here: torch.ao/torchao have no percentile observer. The 0.01 % / 99.99 %
                  quantiles of each batch, averaged over batches weighted by element count (exact quantiles
                  over all batches would need every value kept in memory).
  mse             torchao's HistogramObserver: a 2048-bin histogram, then a search over clipping ranges
                  that minimizes the L2 (squared) quantization error of the histogram — the MSE-optimal range.
Weights are not observed here: `weight_qparams` gives per-output-channel symmetric scales (torchao's
PerChannelMinMaxObserver, range [-(2^(b-1)-1), 2^(b-1)-1], zero point 0).
"""

from __future__ import annotations

import torch
from torchao.quantization.pt2e.observer import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    PerChannelMinMaxObserver,
)

METHODS = ("minmax", "moving_average", "percentile", "mse")
PERCENTILE = 99.99
_QUANTILE_MAX_ELEMS = 1 << 22  # torch.quantile refuses > 16M elements; a strided subsample is plenty


def act_range(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


class PercentileObserver:
    """Running average of per-batch low/high percentiles (see module docstring for why it is hand-written)."""

    def __init__(self, bits: int, percentile: float = PERCENTILE):
        qmin, qmax = act_range(bits)
        self._base = MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_affine, quant_min=qmin, quant_max=qmax)
        self.q = torch.tensor([1.0 - percentile / 100.0, percentile / 100.0])
        self.lo = self.hi = 0.0
        self.count = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().flatten().float()
        n = flat.numel()
        if n > _QUANTILE_MAX_ELEMS:
            flat = flat[:: (n + _QUANTILE_MAX_ELEMS - 1) // _QUANTILE_MAX_ELEMS]
        lo, hi = torch.quantile(flat, self.q.to(flat.device)).tolist()
        self.lo = (self.lo * self.count + lo * n) / (self.count + n)
        self.hi = (self.hi * self.count + hi * n) / (self.count + n)
        self.count += n
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._base._calculate_qparams(torch.tensor([self.lo]), torch.tensor([self.hi]))


def make_observer(method: str, bits: int = 8) -> torch.nn.Module | PercentileObserver:
    """A fresh observer for one activation tensor: call it on every batch, then `qparams(obs)`."""
    qmin, qmax = act_range(bits)
    kw = dict(dtype=torch.qint8, qscheme=torch.per_tensor_affine, quant_min=qmin, quant_max=qmax)
    if method == "minmax":
        return MinMaxObserver(**kw)
    if method == "moving_average":
        return MovingAverageMinMaxObserver(averaging_constant=0.1, **kw)
    if method == "percentile":
        return PercentileObserver(bits)
    if method == "mse":
        return HistogramObserver(bins=2048, **kw)
    raise ValueError(f"observer method {method!r}; allowed: {', '.join(METHODS)}")


def qparams(obs: torch.nn.Module | PercentileObserver, bits: int) -> tuple[float, int, float, float]:
    """(scale as a float32 value, zero point, rmin, rmax) the observer chose; rmin/rmax = the int8 range's ends."""
    qmin, qmax = act_range(bits)
    scale_t, zp_t = obs.calculate_qparams()
    scale = float(torch.as_tensor(scale_t, dtype=torch.float32).reshape(-1)[0])
    zp = int(torch.as_tensor(zp_t).reshape(-1)[0])
    return scale, zp, (qmin - zp) * scale, (qmax - zp) * scale


def weight_qparams(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel (dim 0) symmetric float32 scales: max|w_c| / (2^(b-1)-1)."""
    qmax = (1 << (bits - 1)) - 1
    obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                   quant_min=-qmax, quant_max=qmax)
    obs(w.detach().float().cpu())
    scale, _ = obs.calculate_qparams()
    return scale.to(torch.float32)
