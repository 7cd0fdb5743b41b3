"""Run a traced network functionally with given (predicted) parameters and quantization in the loop.

    net = FakeQuantNet(model)                       # torch.fx trace; works on a meta-device model too
    logits = net(x01, params, wbits=4, abits=8)     # x01 = pixels / 255, NCHW

The quantization follows the exported integer graph, cheaply:
- Input: the integer graph takes (pixel - 128)/255 (int8 code = pixel - 128, zero point 0) with the
  normalization folded into the first conv, so here too the first conv reads x01 - 128/255 with weight
  W / std (per input channel) before its fake-quant, and (mean - 128/255) goes into its bias. Zero padding
  then means pixel 128 at the border, as in the integer graph.
- Weights: per-output-channel symmetric, straight-through estimator. BN is folded into the conv before
  weight quantization in the integer graph. With BN weight 1 (what GHN-Q sets), the fold multiplies output
  channel c by s_c = 1/sqrt(var_c + eps) > 0, and per-channel symmetric fake-quant is scale-equivariant:
  fq(W * s) = s * fq(W) exactly. So conv(x, fq(W)) followed by BN *is* the folded quantized conv (up to
  bias rounding), with batch statistics in training and calibrated statistics in evaluation.
- Activations: per-tensor asymmetric at every tensor the integer graph materializes: after each
  conv/linear(+BN)(+ReLU/ReLU6, fused like TFLite), after residual adds (ReLU fused), SE products,
  pools, other activations, concatenations. Training uses each batch's min/max; evaluation can pass
  fixed ranges collected on calibration images (`ranges`), like a static integer graph.
- Dropout (and any other train-only randomness in the model's modules) acts only in the training forward
  (bn="batch" with nothing collected). Re-estimating BN statistics and evaluating run it off, as
  calibration.bn and the integer graph do: left on, a head dropout made evaluation random (sepnet's float
  top-1 spread 36.6-39.8 % over three identical runs).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ghnq.data import MEAN, STD
from ghnq.graph import trace
from ghnq.movement import PASS_FUNCTIONS, PASS_METHODS

_FUSABLE_ACTS_MOD = (nn.ReLU, nn.ReLU6)
_FUSABLE_ACTS_FN = {F.relu, torch.relu, F.relu6}
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
# Read through, as ghnq.movement.PASS_FUNCTIONS / PASS_METHODS (data movement: the integer graph's `gather` copies
# its input's codes).
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Flatten)


class _StraightThrough(torch.autograd.Function):
    """Returns the fake-quantized value; the gradient passes to the float input unchanged (the STE).

    Why by hand rather than `x + (xq - x).detach()`: that spelling costs two extra full-tensor passes forward
    and one backward, and xq computed without autograd can be built in place; together 4.7x faster on an
    activation-sized tensor on this CPU (torch's own fake_quantize_* kernels were slower here, 1.3x)."""

    @staticmethod
    def forward(ctx, x: Tensor, xq: Tensor) -> Tensor:  # noqa: ARG004 (x only carries the gradient)
        return xq

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def _flat_view(t: Tensor) -> Tensor:
    """All elements as a 1-D view without a copy when the memory is dense (NCHW or NHWC): a whole-tensor
    reduction over a channels-last tensor otherwise copies it first (11x slower here)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t.reshape(-1)


def fq_weight(w: Tensor, bits: int | None) -> Tensor:
    """Per-output-channel symmetric fake-quant (levels ±(2^(b-1)-1)), straight-through gradient."""
    if not bits:
        return w
    qmax = 2 ** (bits - 1) - 1
    wd = w.detach()
    amax = wd.abs().flatten(1).amax(1).clamp_min(1e-8)
    scale = (amax / qmax).view(-1, *([1] * (w.dim() - 1)))
    wq = torch.div(wd, scale).round_().clamp_(-qmax, qmax).mul_(scale)  # round half to even, like torch.round
    return _StraightThrough.apply(w, wq)


def fq_act(x: Tensor, bits: int | None, lo: float | Tensor | None = None, hi: float | Tensor | None = None
           ) -> Tensor:
    """Per-tensor asymmetric fake-quant over [lo, hi] (which always contains 0), straight-through gradient."""
    if not bits:
        return x
    xd = x.detach()
    if lo is None or hi is None:
        lo, hi = torch.aminmax(_flat_view(xd))
    lo = torch.clamp(torch.as_tensor(lo, dtype=x.dtype), max=0.0)
    hi = torch.clamp(torch.as_tensor(hi, dtype=x.dtype), min=0.0)
    levels = 2 ** bits - 1
    scale = ((hi - lo) / levels).clamp_min(1e-8)
    zp = torch.round(-lo / scale)
    xq = torch.div(xd, scale).round_().add_(zp).clamp_(0, levels).sub_(zp).mul_(scale)  # q = clamp(round + zp)
    return _StraightThrough.apply(x, xq)


def _is_fusable_act(n: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if n.op == "call_module":
        return isinstance(modules[n.target], _FUSABLE_ACTS_MOD)
    return n.op == "call_function" and n.target in _FUSABLE_ACTS_FN


def _is_passthrough(n: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if n.op == "call_module":
        return isinstance(modules[n.target], _PASS_MODULES)
    if n.op == "call_function":
        return n.target in PASS_FUNCTIONS
    return n.op == "call_method" and n.target in PASS_METHODS


def quant_points(gm: fx.GraphModule) -> set[str]:
    """Names of fx nodes whose output is a materialized (quantized) tensor of the integer graph."""
    modules = dict(gm.named_modules())
    points = set()
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output", "get_attr") or _is_passthrough(n, modules):
            continue
        users = list(n.users)
        mod = modules.get(n.target) if n.op == "call_module" else None
        is_affine = isinstance(mod, nn.Conv2d | nn.Linear)
        is_norm = isinstance(mod, _NORMS)
        is_add = n.op == "call_function" and n.target in (operator.add, torch.add)
        if len(users) == 1:
            u = users[0]
            if is_affine and u.op == "call_module" and isinstance(modules[u.target], _NORMS):
                continue  # conv → BN: folded
            if (is_affine or is_norm or is_add) and _is_fusable_act(u, modules):
                continue  # fused activation
        points.add(n.name)
    return points


class FakeQuantNet:
    """A traced network executed with external parameters, optional fake-quant, and BN in one of 3 modes.

    bn="batch": normalize with batch statistics (training; also accumulates `collect` when given).
    bn="stats": normalize with `stats[module] = (mean, var)` (evaluation after re-estimation).
    The traced modules (shared with `model`) are put in train mode for the training forward and eval mode
    otherwise, so dropout acts only while training.
    """

    def __init__(self, model: nn.Module, gm: fx.GraphModule | None = None):
        self.gm = gm if gm is not None else trace(model)
        self.modules = dict(self.gm.named_modules())
        self.points = quant_points(self.gm)
        self.nodes = list(self.gm.graph.nodes)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        users = list(placeholders[0].users) if placeholders else []
        # Fold the input normalization into the first conv when the input feeds only convs.
        self.fold_input = bool(users) and all(
            u.op == "call_module" and isinstance(self.modules[u.target], nn.Conv2d) for u in users)

    def __call__(self, x01: Tensor, params: dict[str, Tensor], wbits: int | None = None,
                 abits: int | None = None, bn: str = "batch", stats: dict | None = None,
                 collect: dict | None = None, ranges: dict | None = None, observe: dict | None = None,
                 fold_input: bool = True) -> Tensor:
        """fold_input=False feeds the normalized image instead (zero padding = the mean pixel): what the float
        nn.Module sees, e.g. when calibration.bn re-estimates BN statistics for the integer graph."""
        fold = self.fold_input and fold_input
        training = bn == "batch" and collect is None
        if self.gm.training != training:
            self.gm.train(training)
        mean = torch.tensor(MEAN, dtype=x01.dtype, device=x01.device)
        shift = 128.0 / 255.0  # the integer graph's input zero point: code 0 = pixel 128
        std = torch.tensor(STD, dtype=x01.dtype, device=x01.device)
        env: dict[fx.Node, object] = {}

        def load(a: object) -> object:
            return fx.node.map_arg(a, lambda n: env[n])

        for n in self.nodes:
            if n.op == "placeholder":
                out = x01 - shift if fold else (x01 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
            elif n.op == "get_attr":
                out = getattr(self.gm, n.target)
            elif n.op == "output":
                return load(n.args[0])
            elif n.op == "call_module":
                m = self.modules[n.target]
                x = load(n.args[0])
                if isinstance(m, nn.Conv2d):
                    w, b = params[n.target + ".weight"], params.get(n.target + ".bias")
                    if fold and n.args[0].op == "placeholder":
                        fold_b = -(w * ((mean - shift) / std).view(1, -1, 1, 1)).sum((1, 2, 3))
                        b = fold_b if b is None else b + fold_b
                        w = w / std.view(1, -1, 1, 1)
                    out = F.conv2d(x, fq_weight(w, wbits), b, m.stride, m.padding, m.dilation, m.groups)
                elif isinstance(m, nn.Linear):
                    out = F.linear(x, fq_weight(params[n.target + ".weight"], wbits), params.get(n.target + ".bias"))
                elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                    out = self._bn(n.target, x, m.eps, bn, stats, collect)
                elif isinstance(m, nn.LayerNorm):
                    out = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
                elif isinstance(m, nn.GroupNorm):
                    out = F.group_norm(x, m.num_groups, None, None, m.eps)
                else:  # parameter-free: activations, pools, dropout, flatten
                    out = m(*load(n.args), **load(n.kwargs))
            elif n.op == "call_function" and n.target is F.dropout:
                # the traced call holds the tracing-time mode as a constant: use this forward's
                args, kwargs = load(n.args), load(n.kwargs)
                out = F.dropout(args[0], args[1] if len(args) > 1 else kwargs.get("p", 0.5), training)
            elif n.op == "call_function":
                out = n.target(*load(n.args), **load(n.kwargs))
            else:  # call_method
                args = load(n.args)
                out = getattr(args[0], n.target)(*args[1:], **load(n.kwargs))
            if n.name in self.points and isinstance(out, Tensor):
                if observe is not None:  # running min/max over calibration batches
                    lo, hi = out.detach().min(), out.detach().max()
                    old = observe.get(n.name)
                    if old is not None:
                        lo, hi = torch.minimum(old[0], lo), torch.maximum(old[1], hi)
                    observe[n.name] = (lo, hi)
                if abits:
                    r = ranges.get(n.name) if ranges is not None else None
                    out = fq_act(out, abits, *(r if r is not None else (None, None)))
            env[n] = out
        raise RuntimeError("graph has no output node")

    # "native": training-mode BN (batch statistics, nothing collected) through F.batch_norm, one fused kernel
    # forward and backward, 2.4x faster on this CPU than the spelled-out formulas below ("explicit"), which
    # compute the same function (equal to ~1e-6, tested) and stay for collecting statistics and for comparison.
    batch_norm_kernel = "native"

    def _bn(self, name: str, x: Tensor, eps: float, mode: str, stats: dict | None, collect: dict | None) -> Tensor:
        if mode == "batch" and collect is None and self.batch_norm_kernel == "native":
            return F.batch_norm(x, None, None, training=True, eps=eps)
        dims = [0] + list(range(2, x.dim()))
        if mode == "stats":
            mean, var = stats[name]
        else:
            mean = x.mean(dims)
            var = x.var(dims, unbiased=False)
            if collect is not None:
                # Exactly what calibration.bn.recalibrate_bn leaves in a BatchNorm (momentum=None): the cumulative
                # average over batches, each weighing 1, of the batch mean and the *unbiased* batch variance. The
                # integer graph is built from those statistics, so the train loop's evaluation must use the same
                # (a pooled E[x²] - E[x]² over unequal batches was 2 int8 logit steps away from the exported graph).
                cnt, s_mean, s_var = collect.get(name, (0, 0.0, 0.0))
                n = x.numel() // x.shape[1]
                collect[name] = (cnt + 1, s_mean + mean.detach(), s_var + (var * (n / max(n - 1, 1))).detach())
        shape = [1, -1] + [1] * (x.dim() - 2)
        return (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)


def finalize_stats(collect: dict) -> dict:
    """Averages from `collect` → stats for bn="stats": per BN the mean over batches of the batch mean and of the
    unbiased batch variance, as torch's BatchNorm running statistics with momentum=None."""
    return {k: (m / c, v / c) for k, (c, m, v) in collect.items()}
