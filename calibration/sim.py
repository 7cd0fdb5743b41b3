"""Fake-quant simulation of a QuantizedModel in torch, and the float op executor calibration uses.

`run_ops` executes a QuantizedModel-style op list in float (NCHW inside, batched, CPU or CUDA) and calls
`hook(tensor_name, value)` on every op output: calibration runs it with float weights and observer hooks.

`Simulator` runs the QuantizedModel itself: every tensor is held as its quantized codes (integers stored
in float64 tensors, batched, CPU or CUDA), quantized at exactly the QM's tensors with the QM's
(scale, zero point, bits). Each op dequantizes its inputs, computes, and quantizes its output again:
    conv / depthwise / fc / mul / mean: the exact integer accumulator acc = Σ (q_x - zp_x)·q_w + q_b
      (float64 holds it exactly), then requantized to the output scale;
    add: in real values, y = (q_a - zp_a)·s_a + (q_b - zp_b)·s_b, then q = round_half_away(y / s_out) + zp_out;
    the table ops (qmodel.TABLE_OPS): calibration.reference.table_for in every rounding mode (the
      256-entry int8 table of ExecuTorch's fp32 op, which the TFLite writer writes as CAST → ADD → GATHER, so
      all runtimes agree);
    max/avg pool, pad, reshape: on the codes (they share their input's scale);
then the fused-activation clamp and the saturating cast to the tensor's [qmin, qmax] (4-bit activations
exist only here). Requantization (`rounding`):
    "tflite" (default): the integer kernels' own rule — conv/depthwise/mul/mean apply TFLite's fixed-point
      multiplier (MultiplyByQuantizedMultiplier: rounding-doubling high-mul, then rounding right shift;
      MEAN with LiteRT's 1/N-folded multiplier), fully_connected rounds double(acc)·s_in·s_w/s_out half
      away from zero (LiteRT 2.3.0's per-channel reference kernel). Only add is computed in float (TFLite
      uses a left-shift-20 fixed-point rescale) and may differ from the integer reference by one code.
    "float": textbook fake-quant, round_half_away(acc · s_in·s_w[c] / s_out) everywhere.
    "xnnpack": the arithmetic of XNNPACK's int8 kernels, which LiteRT's default delegate and ExecuTorch's
      XNNPACK backend run (functions `xnn_*` below, each naming its XNNPACK source): conv / depthwise / fc /
      mul in float32 ("fp32" requantization, round half to even), add with XNNPACK's own integer
      multipliers and shift, mean with 1/N and the zero points folded into a float32 scale and offset.
      The table ops are the shared table (LiteRT runs the writer's GATHER outside the delegate).
    "executorch": "xnnpack", except the ops ExecuTorch's XNNPACK partitioner lowers only in fp32 (they run
      inside the delegate between convert ops: dequantize → float32 op → quantize, see `et_*` below):
      the table ops (the shared tables above, which are defined as this fp32 computation) and avg_pool2d
      (XNNPACK's float32 pooling sum and 1/count multiplier). Pad is exact either way (the round trip of a
      code through float32 returns the code; the padding value real 0 is the zero point).
The input is the int8 code `pixel - 128` (scale 1/255, zero point 0).

Integer weights swapped in (the low-bit evolutionary search): `Simulator(qm, device)` keeps the constants
on the device; `Simulator.forward(x_codes, weights={weight_key: int8 codes})` replaces the named weights'
codes (same shape; the QM's per-channel scales and biases are kept) for that call only and returns the
int8 logit codes as a torch tensor on the device, batched over images. `qm.weight_keys()` lists the keys.
Conv / depthwise / fc accumulators are computed in float32 (exact_integer_conv2d: exact while partial sums stay
below 2^24, split or float64 otherwise), 1.6x faster on this CPU than float64 convolution.
On CUDA, `dtype=torch.float32` is faster and still exact while every accumulator stays below 2^24.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from calibration.qmodel import CLAMP_OPS, TABLE_OPS, WEIGHTED_OPS, Op, QuantizedModel, input_codes
from calibration.reference import activation_range, mean_multiplier, mul_scale, op_table, quantize_multiplier

Hook = Callable[[str, torch.Tensor], torch.Tensor]
ROUNDINGS = ("tflite", "float", "xnnpack", "executorch")
ET_FP32_OPS = (*TABLE_OPS, "avg_pool2d")  # what rounding="executorch" computes as dequantize → float32 → quantize
_CLAMP = {"none": (None, None), "relu": (0.0, None), "relu6": (0.0, 6.0), "relu_0_to_1": (0.0, 1.0)}


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero (TFLite's rounding), not torch.round's half-to-even."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _fused(y: torch.Tensor, op: Op) -> torch.Tensor:
    lo, hi = _CLAMP[op.attrs.get("fused", "none")]
    return y if lo is None else y.clamp(lo, hi)


def _to_nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1) if x.dim() == 4 else x


def _to_nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2) if x.dim() == 4 else x


def _pad(x: torch.Tensor, padding: list[int], value: float = 0.0) -> torch.Tensor:
    t, b, left, r = padding
    return F.pad(x, (left, r, t, b), value=value) if any(padding) else x


def _repeat(x: torch.Tensor, factor: list[int]) -> torch.Tensor:
    """Nearest upsampling by whole factors (NCHW): every pixel repeated fh × fw times."""
    return x.repeat_interleave(factor[0], dim=2).repeat_interleave(factor[1], dim=3)


SELU_ALPHA, SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946  # torch's


def table_function(kind: str, attrs: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """The float function of a table op (qmodel.TABLE_OPS)."""
    if kind == "celu":
        alpha = float(attrs["alpha"])
        return lambda x: F.celu(x, alpha)
    if kind == "leaky_relu":
        alpha = float(attrs["alpha"])
        return lambda x: F.leaky_relu(x, alpha)
    if kind == "elu":
        alpha = float(attrs["alpha"])
        return lambda x: F.elu(x, alpha)
    if kind == "prelu":
        alpha = torch.tensor(attrs["alpha"], dtype=torch.float32)
        return lambda x: F.prelu(x, alpha.to(x))
    if kind == "hardtanh":
        lo, hi = attrs["min"], attrs["max"]
        return lambda x: x.clamp(min=lo, max=hi)
    if kind == "softplus":
        beta, threshold = float(attrs["beta"]), float(attrs["threshold"])
        return lambda x: F.softplus(x, beta, threshold)
    return {"hardswish": F.hardswish, "sigmoid": torch.sigmoid, "silu": F.silu, "tanh": torch.tanh,
            "gelu": F.gelu, "mish": F.mish, "selu": F.selu, "softsign": F.softsign}[kind]


def run_op(op: Op, args: list[torch.Tensor]) -> torch.Tensor:
    """One op in float, NCHW for 4-D tensors."""
    a = op.attrs
    k = op.kind
    if k in ("conv2d", "depthwise_conv2d"):
        x, w, b = args
        groups = x.shape[1] // w.shape[1]  # 1, grouped, or depthwise (TFLite's rule: C_in / the filter's inputs)
        y = F.conv2d(_pad(x, a["padding"]), w, b, stride=a["stride"], dilation=a["dilation"], groups=groups)
        return _fused(y, op)
    if k == "fully_connected":
        return _fused(F.linear(*args), op)
    if k == "add":
        return _fused(args[0] + args[1], op)
    if k == "sub":
        return _fused(args[0] - args[1], op)
    if k == "mul":
        return _fused(args[0] * args[1], op)
    if k == "mean":
        return args[0].mean(dim=(2, 3), keepdim=a["keepdims"])
    if k == "max_pool2d":
        return F.max_pool2d(_pad(args[0], a["padding"], float("-inf")), a["kernel"], a["stride"])
    if k == "avg_pool2d":
        x = args[0]
        total = F.avg_pool2d(_pad(x, a["padding"]), a["kernel"], a["stride"], divisor_override=1)
        ones = _pad(torch.ones_like(x[:1, :1]), a["padding"])
        return total / F.avg_pool2d(ones, a["kernel"], a["stride"], divisor_override=1)
    if k in TABLE_OPS:
        return table_function(k, a)(args[0])
    if k in CLAMP_OPS:
        return args[0].clamp(*_CLAMP[k])
    if k == "softmax":
        return F.softmax(args[0], dim=-1)
    if k == "resize_nearest":
        return _repeat(args[0], a["factor"])
    if k == "pad":
        return _pad(args[0], a["padding"])
    if k == "reshape":
        return _to_nchw(_to_nhwc(args[0]).reshape(args[0].shape[0], *a["shape"][1:]))
    if k == "concat":
        return torch.cat(args, dim=1)  # channels: NHWC axis 3 is NCHW dim 1 (2-D: dim 1 either way)
    if k == "gather":
        return args[0][:, a["indices"]]  # channels: NCHW dim 1
    raise ValueError(f"op kind {k!r}")


def run_ops(ops: list[Op], input_name: str, x: torch.Tensor, consts: dict[str, torch.Tensor],
            hook: Hook | None = None) -> dict[str, torch.Tensor]:
    """Execute `ops` on `x` (NCHW float); returns every activation by name (after `hook`)."""
    env = {input_name: hook(input_name, x) if hook else x}
    for op in ops:
        y = run_op(op, [env[n] if n in env else consts[n] for n in op.inputs])
        env[op.outputs[0]] = hook(op.outputs[0], y) if hook else y
    return env


class Simulator:
    """Fake-quant simulation of one QuantizedModel on one device (see module docstring)."""

    def __init__(self, qm: QuantizedModel, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64,
                 rounding: str = "tflite"):
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding {rounding!r}; allowed: {', '.join(ROUNDINGS)}")
        # "executorch" is "xnnpack" plus the fp32-inside-delegate ops (self.fp32_ops)
        self.arithmetic = rounding
        self.fp32_ops = ET_FP32_OPS if rounding == "executorch" else ()
        rounding = "xnnpack" if rounding == "executorch" else rounding
        self.qm, self.device, self.dtype, self.rounding = qm, torch.device(device), dtype, rounding
        self.consts = {n: torch.as_tensor(t.data, device=self.device).to(dtype)
                       for n, t in qm.tensors.items() if t.is_const}
        self.q = {n: (*t.qparams, t.qmin, t.qmax)
                  for n, t in qm.tensors.items() if not t.is_const}
        self.params = [self._prepare(op) for op in qm.ops]

    def _prepare(self, op: Op) -> dict:
        """Per-op constants computed once (the Prepare step of a TFLite kernel)."""
        out = op.outputs[0]
        s_out, zp_out, qmin, qmax = self.q[out]
        p: dict = {"clamp": activation_range(op, s_out, zp_out, qmin, qmax)}
        dev = self.device
        if op.kind in WEIGHTED_OPS:
            s_in = self.q[op.inputs[0]][0]
            s_w = self.qm.tensors[op.inputs[1]].scale
            eff = [float(s_in) * float(s) / float(s_out) for s in s_w]
            p["eff"] = torch.tensor(eff, dtype=torch.float64, device=dev)
            mults = [quantize_multiplier(e) for e in eff]
            p["mult"] = torch.tensor([m for m, _ in mults], dtype=torch.int64, device=dev)
            p["shift"] = torch.tensor([s for _, s in mults], dtype=torch.int64, device=dev)
        elif op.kind == "mul":
            (sa, _, _, _), (sb, _, _, _) = self.q[op.inputs[0]], self.q[op.inputs[1]]
            p["eff"] = mul_scale(sa, sb, s_out)
            p["mult"], p["shift"] = quantize_multiplier(p["eff"])
        elif op.kind in TABLE_OPS:
            # the integer reference's table (ExecuTorch's fp32 op per code), whatever the rounding mode:
            # every runtime evaluates this same table, so the sim is bit-exact here in all of them
            qi, qo = self.q[op.inputs[0]], self.q[op.outputs[0]]
            lut = op_table(op, qi, qo)
            p["lut"] = torch.as_tensor(lut.ravel().astype(np.float64), device=dev).to(self.dtype)
            # index = code + 128, plus 256 · channel for a per-channel table (a prelu's; channels are dim 1 here)
            rank = len(self.qm.tensors[op.inputs[0]].shape)
            offset = 128 + 256 * torch.arange(len(lut) if lut.ndim == 2 else 1, device=dev)
            p["offset"] = offset.view(1, -1, *[1] * (rank - 2)) if lut.ndim == 2 else offset[0]
        elif op.kind == "softmax":
            p["exp_table"] = torch.tensor(op.attrs["exp_table"], dtype=torch.int64, device=dev)
            p["bits"] = self.qm.tensors[op.outputs[0]].bits
        elif op.kind == "mean":
            shape = self.qm.tensors[op.inputs[0]].shape
            n = shape[1] * shape[2]
            p["n"] = n
            p["eff"] = float(self.q[op.inputs[0]][0]) / (n * float(s_out))
            p["mult"], p["shift"] = mean_multiplier(self.q[op.inputs[0]][0], s_out, n)
        if self.rounding == "xnnpack":
            p["xnn"] = xnn_params(self.qm, op)
        return p

    def _requantize(self, acc: torch.Tensor, p: dict, per_channel: bool) -> torch.Tensor:
        """Integer accumulator → output code offset (before + zp_out)."""
        view = (lambda t: t.view(1, -1, *([1] * (acc.dim() - 2)))) if per_channel else (lambda t: t)
        if self.rounding == "float":
            eff = view(p["eff"]) if per_channel else p["eff"]
            return round_half_away(acc * eff)
        if self.rounding == "xnnpack":
            scale = torch.as_tensor(p["xnn"]["scale"], device=acc.device)
            return xnn_fp32_requantize(acc, view(scale) if per_channel else scale)
        mult = view(p["mult"]) if per_channel else p["mult"]
        shift = view(p["shift"]) if per_channel else p["shift"]
        return multiply_by_quantized_multiplier(acc.to(torch.int64), mult, shift).to(acc.dtype)

    def _op(self, op: Op, p: dict, args: list[torch.Tensor]) -> torch.Tensor:
        k, a = op.kind, op.attrs
        s_out, zp_out, _, _ = self.q[op.outputs[0]]
        ins = [self.q.get(n) for n in op.inputs]
        if k in WEIGHTED_OPS:
            x, w, b = args
            xo = x - ins[0][1]
            if k == "fully_connected":
                acc = exact_integer_linear(xo, w, b)
                if self.rounding == "xnnpack":
                    y = self._requantize(acc, p, per_channel=True)
                else:
                    y = round_half_away(acc * p["eff"])  # LiteRT's per-channel FC reference rounds this in double
            else:
                groups = x.shape[1] // w.shape[1]
                acc = exact_integer_conv2d(_pad(xo, a["padding"]), w, b, stride=a["stride"], dilation=a["dilation"],
                                           groups=groups)
                y = self._requantize(acc, p, per_channel=True)
        elif k == "mul":
            acc = (args[0] - ins[0][1]) * (args[1] - ins[1][1])
            y = self._requantize(acc, p, per_channel=False)
        elif k == "mean":
            acc = (args[0] - ins[0][1]).sum(dim=(2, 3), keepdim=a["keepdims"])
            if self.rounding == "xnnpack":
                y = xnn_mean_requantize(acc + p["n"] * ins[0][1], p["xnn"]) - zp_out
            else:
                y = self._requantize(acc, p, per_channel=False)
        elif k in ("add", "sub"):
            if self.rounding == "xnnpack":
                y = xnn_add(args[0] - ins[0][1], args[1] - ins[1][1], p["xnn"])
            else:
                real = [(t - q[1]) * q[0] for t, q in zip(args, ins, strict=True)]
                y = round_half_away((real[0] + real[1] if k == "add" else real[0] - real[1]) / s_out)
        elif k in TABLE_OPS:
            lo, hi = p["clamp"]
            return p["lut"][(args[0] + p["offset"]).long()].clamp(lo, hi)
        elif k == "softmax":  # integers only, as calibration.reference.softmax (every rounding mode)
            q, half = args[0].long(), 1 << (p["bits"] - 1)
            e = p["exp_table"][q - q.amax(dim=-1, keepdim=True) + 255]
            total = e.sum(dim=-1, keepdim=True)
            y = torch.div(e * (2 * half) + total // 2, total, rounding_mode="floor") - half
            return y.clamp(max=half - 1).to(args[0].dtype)
        elif k == "max_pool2d":
            return F.max_pool2d(_pad(args[0], a["padding"], float("-inf")), a["kernel"], a["stride"])
        elif k == "avg_pool2d" and "avg_pool2d" in self.fp32_ops:
            return et_avg_pool(args[0], a, *ins[0][:2]).to(args[0].dtype)
        elif k == "avg_pool2d":
            x = args[0]
            total = F.avg_pool2d(_pad(x, a["padding"]), a["kernel"], a["stride"], divisor_override=1)
            count = F.avg_pool2d(_pad(torch.ones_like(x[:1, :1]), a["padding"]), a["kernel"], a["stride"],
                                 divisor_override=1)
            return round_half_away(total / count)  # TFLite: (sum ± count/2) / count, truncating
        elif k in CLAMP_OPS:
            y = args[0] - zp_out  # the output shares the input's (scale, zp): only the clamp below acts
        elif k == "resize_nearest":
            return _repeat(args[0], a["factor"])  # shares its input's (scale, zp): the codes are copied
        elif k == "pad":
            return _pad(args[0], a["padding"], float(ins[0][1]))
        elif k == "reshape":
            return _to_nchw(_to_nhwc(args[0]).reshape(args[0].shape[0], *a["shape"][1:]))
        elif k == "concat":
            return torch.cat(args, dim=1)  # one shared (scale, zp): the codes are copied
        elif k == "gather":
            return args[0][:, a["indices"]]  # shares its input's (scale, zp): the codes are copied
        else:
            raise ValueError(f"op kind {k!r}")
        lo, hi = p["clamp"]
        return (y + zp_out).clamp(lo, hi)

    @torch.no_grad()
    def forward(self, x_codes: torch.Tensor, weights: dict[str, torch.Tensor] | None = None,
                capture: bool = False) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """int8 input codes NHWC [N, H, W, C] → int8 output codes (+ every tensor's codes, NHWC, if capture)."""
        consts = self.consts
        if weights:
            consts = dict(consts)
            for name, q in weights.items():
                if name not in consts or tuple(q.shape) != tuple(consts[name].shape):
                    raise KeyError(f"{name!r}: not a weight of this model or wrong shape; keys: qm.weight_keys()")
                consts[name] = torch.as_tensor(q, device=self.device).to(self.dtype)
        env = {self.qm.input: _to_nchw(x_codes.to(self.device, self.dtype))}
        for op, p in zip(self.qm.ops, self.params, strict=True):
            env[op.outputs[0]] = self._op(op, p, [env[n] if n in env else consts[n] for n in op.inputs])
        logits = env[self.qm.output].to(torch.int8)
        if not capture:
            return logits
        return logits, {n: _to_nhwc(c).to(torch.int8) for n, c in env.items()}

    def run(self, images: np.ndarray, weights: dict[str, torch.Tensor] | None = None, capture: bool = False,
            batch_size: int = 256) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
        """uint8 NHWC images → int8 logit codes [N, classes] (numpy), batched; + all tensors' codes if capture."""
        outs, caps = [], {}
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(input_codes(images[i:i + batch_size]))
            res = self.forward(x, weights, capture)
            if capture:
                res, c = res
                for n, v in c.items():
                    caps.setdefault(n, []).append(v.cpu().numpy())
            outs.append(res.cpu().numpy())
        logits = np.concatenate(outs)
        if not capture:
            return logits
        return logits, {n: np.concatenate(v) for n, v in caps.items()}


def simulate(qm: QuantizedModel, images: np.ndarray, weights: dict[str, torch.Tensor] | None = None,
             capture: bool = False, device: str = "cpu", batch_size: int = 256, rounding: str = "tflite"
             ) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
    """Fake-quant run of `qm` on uint8 NHWC images: int8 logit codes (and every tensor's codes if capture)."""
    return Simulator(qm, device, rounding=rounding).run(images, weights, capture, batch_size)


# ----------------------------------------------------------------------------------------------------
# Exact integer accumulators at float32 speed. Why by hand: torch has no integer convolution on CPU or CUDA,
# and float64 convolution has no fast kernel (on this CPU ~50x slower than float32 through oneDNN). Integer
# products summed in float32 are exact, in any summation order, while every partial sum stays below 2^24 in
# magnitude: bounded by max_c Σ|q_w[c]| · max|q_x - zp_x|. Above that bound the input is split into 16·hi + lo
# (lo in [0, 15], hi in [-16, 15]) and each half accumulated in float32, combined in float64; above even that
# (fan-in beyond ~8,000 at 8 bits) float64 is used. TF32 is switched off on CUDA: it would round the products.

F32_EXACT = 2.0 ** 24


def _exact_integer_op(run, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """run(x, w) with integer-valued x and w, computed exactly; + b (exact in float64); in x's dtype."""
    w_l1 = float(w.abs().flatten(1).sum(1).max()) if w.numel() else 0.0
    x_max = float(x.abs().max()) if x.numel() else 0.0
    with _no_tf32(x.device):
        if w_l1 * x_max < F32_EXACT:
            acc = run(x.float(), w.float()).double()
        elif w_l1 * 16 < F32_EXACT:
            hi = torch.floor(x / 16)
            acc = run(hi.float(), w.float()).double() * 16 + run((x - 16 * hi).float(), w.float()).double()
        else:
            acc = run(x.double(), w.double())
    if b is not None:
        acc = acc + b.double().view(1, -1, *([1] * (acc.dim() - 2)))
    return acc.to(x.dtype)


@contextlib.contextmanager
def _no_tf32(device: torch.device):
    if device.type != "cuda":
        yield
        return
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(prev)


def exact_integer_conv2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, **conv_args) -> torch.Tensor:
    """F.conv2d on integer-valued tensors with the exact integer result (see above)."""
    return _exact_integer_op(lambda xx, ww: F.conv2d(xx, ww, None, **conv_args), x, w, b)


def exact_integer_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """F.linear on integer-valued tensors with the exact integer result (see above)."""
    return _exact_integer_op(F.linear, x, w, b)


# ----------------------------------------------------------------------------------------------------
# TFLite's fixed-point requantization on int64 torch tensors (the same rules as calibration.reference)


def saturating_rounding_doubling_high_mul(a: torch.Tensor, b: torch.Tensor | int) -> torch.Tensor:
    ab = a * b
    nudge = torch.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    return torch.div(ab + nudge, 1 << 31, rounding_mode="trunc")  # (a = b = INT32_MIN cannot occur: b > 0)


def rounding_divide_by_pot(x: torch.Tensor, exponent: torch.Tensor | int) -> torch.Tensor:
    e = torch.as_tensor(exponent, dtype=torch.int64, device=x.device)
    mask = (torch.ones_like(e) << e) - 1
    threshold = (mask >> 1) + (x < 0).to(torch.int64)
    return (x >> e) + ((x & mask) > threshold).to(torch.int64)


def multiply_by_quantized_multiplier(x: torch.Tensor, mult: torch.Tensor | int, shift: torch.Tensor | int
                                     ) -> torch.Tensor:
    shift = torch.as_tensor(shift, dtype=torch.int64, device=x.device)
    left, right = shift.clamp(min=0), (-shift).clamp(min=0)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x << left, mult), right)


# ----------------------------------------------------------------------------------------------------
# XNNPACK's int8 arithmetic (google/XNNPACK, as LiteRT 2.3.0's delegate runs it: measured code for code
# per op in tests/test_xnnpack_rounding.py). Scales are float32 products/quotients evaluated left to right
# in float32, as the C code does; torch.round is round half to even, as lrintf / cvtps2dq / the magic bias.
_f32 = np.float32


def xnn_params(qm: QuantizedModel, op: Op) -> dict:
    """The per-op constants XNNPACK derives from the (float32) scales and zero points when it creates the op."""
    t = qm.tensors
    s_in, s_out = _f32(t[op.inputs[0]].scale[0]), _f32(t[op.outputs[0]].scale[0])
    if op.kind in WEIGHTED_OPS:
        # src/operators/convolution-nhwc.c init_requantization_scale_qx8_qc8w, fully-connected-nc.c:
        # requantization_scale[c] = input_scale * kernel_scale[c] / output_scale (float32)
        return {"scale": torch.from_numpy((s_in * np.asarray(t[op.inputs[1]].scale, _f32)) / s_out)}
    if op.kind == "mul":
        # src/microparams-init.c xnn_init_qs8_mul_minmax_scalar_params: (a_scale * b_scale) / output_scale
        return {"scale": torch.tensor(float((s_in * _f32(t[op.inputs[1]].scale[0])) / s_out), dtype=torch.float32)}
    if op.kind in ("add", "sub"):
        # a subtract is XNNPACK's add kernel with b's scale negated (src/operators/binary-elementwise-nd.c)
        s_b = _f32(t[op.inputs[1]].scale[0]) * (-1 if op.kind == "sub" else 1)
        return xnn_add_params(s_in, s_b, s_out, int(t[op.inputs[0]].zero_point[0]), int(t[op.inputs[1]].zero_point[0]))
    if op.kind == "mean":
        # src/microparams-init.c xnn_init/update_qs8_reduce_scalar_params: scale = (s_in / s_out) * (1.0f / N);
        # src/operators/reduce-nd.c: the int32 sum of raw codes is converted with inv_y_scale = scale and
        # y_zero_point' = zp_out - (N * zp_in) * scale, all float32
        shape = t[op.inputs[0]].shape
        n = shape[1] * shape[2]
        scale = _f32(_f32(s_in / s_out) * _f32(_f32(1.0) / _f32(n)))
        offset = _f32(_f32(t[op.outputs[0]].zero_point[0]) - _f32(_f32(n * int(t[op.inputs[0]].zero_point[0])) * scale))
        return {"scale": float(scale), "offset": float(offset)}
    return {}


def xnn_add_params(sa: np.float32, sb: np.float32, so: np.float32, zpa: int, zpb: int) -> dict:
    """src/microparams-init.c xnn_init_qs8_add_minmax_scalar_params: 21-bit multipliers, shift = 20 - exponent."""
    a, b = _f32(sa / so), _f32(sb / so)
    shift = 20 - (int(np.frexp(max(abs(a), abs(b)))[1]) - 1)  # 20 - unbiased exponent of the larger |scale|
    am, bm = (int(np.rint(np.ldexp(v, shift).astype(_f32))) for v in (a, b))  # lrintf, half to even
    return {"a_mult": am, "b_mult": bm, "shift": shift, "zp": (zpa, zpb)}


def xnn_fp32_requantize(acc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """src/qs8-gemm/, src/qs8-dwconv/, src/qs8-vmul/ "fp32" variants: (float) acc * scale, round half to even.

    (The kernels clamp in float before rounding; clamping the rounded integer to the same integer bounds
    afterwards gives the same code.)"""
    return torch.round(acc.to(torch.float32) * scale).to(acc.dtype)


def xnn_add(xa: torch.Tensor, xb: torch.Tensor, p: dict) -> torch.Tensor:
    """src/qs8-vadd/gen/qs8-vadd-minmax-scalar-u1.c on zero-point-subtracted codes:
    asr(2^(shift-1) + xa·a_mult + xb·b_mult, shift), i.e. rounding half up (the int32 sum cannot overflow)."""
    i64 = torch.int64  # exact in int64 whatever dtype the sim holds codes in
    acc = (1 << (p["shift"] - 1)) + xa.to(i64) * p["a_mult"] + xb.to(i64) * p["b_mult"]
    return (acc >> p["shift"]).to(xa.dtype)


def xnn_mean_requantize(total: torch.Tensor, p: dict) -> torch.Tensor:
    """src/reference/unary-elementwise.cc quantize<int8>(float(sum), inv_y_scale, y_zero_point):
    nearbyint(float(sum) * scale + offset) in float32 (two roundings: x86 builds do not fuse the multiply-add)."""
    f = torch.float32
    y = total.to(f) * torch.tensor(p["scale"], dtype=f, device=total.device) + torch.tensor(p["offset"], dtype=f,
                                                                                            device=total.device)
    return torch.round(y).to(total.dtype)


# ----------------------------------------------------------------------------------------------------
# ExecuTorch's XNNPACK delegate runs the table ops and avg_pool2d in float32 between convert ops (its partitioner
# configs for them allow FP32 only). Measured code for code with one op alone in the ExecuTorch 1.5.1 runtime
# on every input code (tests/test_export_executorch.py): convert qs8 → f32 is float32(q − zp) · s; convert
# f32 → qs8 is round half to even of y · float32(1 / s_out), plus zp, saturated.


def _et_quantize(y: torch.Tensor, s_out: float, zp_out: int) -> torch.Tensor:
    inv = torch.tensor(_f32(1) / _f32(s_out), dtype=torch.float32, device=y.device)
    return (torch.round(y.to(torch.float32) * inv) + zp_out).clamp(-128, 127)


def et_hardswish_table(q_in: tuple[float, int], q_out: tuple[float, int]) -> np.ndarray:
    """int8 code + 128 → output code: XNNPACK's f32 hardswish of the dequantized code, quantized. The float32
    evaluation order matters on ties: x · (min(max(x + 3, 0), 6) · (1/6)) is the one that matches the runtime
    on every code (measured; x·(1/6)·clamp and x·clamp/6 miss 1–2 of 768 codes with round scales)."""
    x = torch.arange(-128, 128, dtype=torch.float32).sub(q_in[1]).mul(torch.tensor(_f32(q_in[0])))
    y = x * ((x + 3.0).clamp(0.0, 6.0) * torch.tensor(_f32(1.0 / 6.0)))
    return _et_quantize(y, *q_out).numpy().astype(np.int8)


def et_table(kind: str, q_in: tuple[float, int], q_out: tuple[float, int], **params: float) -> np.ndarray:
    """int8 code + 128 → output code of a table op (qmodel.TABLE_OPS): XNNPACK's f32 op of the dequantized
    code, quantized, as ExecuTorch's delegate runs it (every one is FP32-only in its partitioner configs).
      hardswish: `et_hardswish_table` (the float32 evaluation order matters on ties);
      leaky_relu: x < 0 ? x · float32(alpha) : x, in float32 (XNNPACK's f32 kernel: one rounding);
      the others: the correctly rounded float32 value of the function (evaluated in float64; `params` are the op's
        attrs: alpha, softplus's beta and threshold, hardtanh's min and max).
        XNNPACK evaluates them with float32 approximations of its own, within a few ulps; the quantized code differs
        only where y / s_out is within ~1e-5 of a rounding tie. Measured: the runtime's codes equal this table on
        every code of every (scale, zero point) tried (tests/test_export_executorch.py,
        benchmarks/bench_table_ops.py: 40 random draws per op, 0 of 61,440 codes differ; elu, which runs on the
        portable kernels beside the delegate: 0 of 10,240)."""
    if kind == "hardswish":
        return et_hardswish_table(q_in, q_out)
    x = torch.arange(-128, 128, dtype=torch.float32).sub(q_in[1]).mul(torch.tensor(_f32(q_in[0])))
    if kind == "leaky_relu":
        y = torch.where(x < 0, x * torch.tensor(_f32(params["alpha"])), x)
    else:
        y = table_function(kind, params)(x.double()).to(torch.float32)
    return _et_quantize(y, *q_out).numpy().astype(np.int8)


def et_avg_pool(x: torch.Tensor, a: dict, s: float, zp: int) -> torch.Tensor:
    """XNNPACK's f32 average pooling of the dequantized codes (NCHW), quantized with the shared (s, zp).

    The window's taps are read column by column (XNNPACK's pooling indirection buffer), padded taps are 0.0,
    summed in the 9-tap microkernel's tree order ((v0+v1)+v8)+(v6+v7) added to (v2+v3)+(v4+v5), then multiplied
    by float32(1 / in-range count) (the pixelwise multiplier). A window of more than 9 taps runs the same kernel
    in passes (XNNPACK's f32-avgpool "9p" microkernels): each pass sums its next 9 taps in that tree order (0.0
    for the taps past the end) and adds the sum to the previous passes' total."""
    n, c, h, w = x.shape
    kh, kw = a["kernel"]
    t, b, left, r = a.get("padding", [0, 0, 0, 0])
    xf = (x.to(torch.float32) - zp) * torch.tensor(_f32(s))
    cols = F.unfold(F.pad(xf, (left, r, t, b)), (kh, kw), stride=a["stride"])  # [N, C·kh·kw, L], taps row-major
    taps = cols.view(n, c, kh, kw, -1).transpose(2, 3).reshape(n, c, kh * kw, -1)  # column-major taps
    ones = F.unfold(F.pad(torch.ones(1, 1, h, w, device=x.device), (left, r, t, b)), (kh, kw), stride=a["stride"])
    mult = 1.0 / ones.sum(1).to(torch.float32)  # [1, L], float32 division, as XNNPACK fills its multiplier buffer
    total = None
    for first in range(0, kh * kw, 9):  # one pass per 9 taps, each added to the previous passes' sum
        v = list(taps[:, :, first:first + 9].unbind(2))
        v += [torch.zeros_like(v[0])] * (9 - len(v))
        part = ((v[2] + v[3]) + (v[4] + v[5])) + (((v[0] + v[1]) + v[8]) + (v[6] + v[7]))
        total = part if total is None else total + part  # the first pass adds its sum to 0.0: exact
    oh = (h + t + b - kh) // a["stride"][0] + 1
    ow = (w + left + r - kw) // a["stride"][1] + 1
    return _et_quantize((total * mult).view(n, c, oh, ow), s, zp)
