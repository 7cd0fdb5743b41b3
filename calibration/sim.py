"""Fake-quant simulation of a QuantizedModel in torch, and the float op executor it shares with calibration.

`run_ops` executes a QuantizedModel-style op list in float (NCHW inside, batched, CPU or CUDA) and calls
`hook(tensor_name, value)` on every op output. Calibration runs it with float weights and observer hooks;
the simulation runs it with dequantized weights and a hook that quantizes every output to exactly the
QuantizedModel's (scale, zero point, bits) and dequantizes it again:

    q = clamp(round_half_away(y / scale) + zero_point, qmin, qmax),   y' = (q - zero_point) · scale

Fused activations are clamps in float before that (relu: ≥ 0, relu6: [0, 6], relu_0_to_1: [0, 1]). Weights
are `q_w · s_w[c]`, biases `q_b · s_b[c]`. Activation bits come from each tensor (4-bit activations exist
only here). The input is the int8 code `pixel - 128` (scale 1/255, zero point -128).

Integer weights swapped in (the low-bit evolutionary search): `Simulator(qm, device)` keeps the dequantized
constants on the device; `Simulator.forward(x_codes, weights={weight_key: int8 codes})` replaces the named
weights' codes (same shape, same per-channel scales as the QM) for that call only and returns int8 logit
codes as a torch tensor on the device, batched over images. `qm.weight_keys()` lists the keys.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from calibration.qmodel import Op, QuantizedModel

Hook = Callable[[str, torch.Tensor], torch.Tensor]
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


def run_op(op: Op, args: list[torch.Tensor]) -> torch.Tensor:
    """One op in float, NCHW for 4-D tensors."""
    a = op.attrs
    k = op.kind
    if k in ("conv2d", "depthwise_conv2d"):
        x, w, b = args
        groups = x.shape[1] if k == "depthwise_conv2d" else 1
        y = F.conv2d(_pad(x, a["padding"]), w, b, stride=a["stride"], dilation=a["dilation"], groups=groups)
        return _fused(y, op)
    if k == "fully_connected":
        return _fused(F.linear(*args), op)
    if k == "add":
        return _fused(args[0] + args[1], op)
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
    if k == "hardswish":
        return F.hardswish(args[0])
    if k == "pad":
        return _pad(args[0], a["padding"])
    if k == "reshape":
        return _to_nchw(_to_nhwc(args[0]).reshape(args[0].shape[0], *a["shape"][1:]))
    raise ValueError(f"op kind {k!r}")


def run_ops(ops: list[Op], input_name: str, x: torch.Tensor, consts: dict[str, torch.Tensor],
            hook: Hook | None = None) -> dict[str, torch.Tensor]:
    """Execute `ops` on `x` (NCHW float); returns every activation by name (after `hook`)."""
    env = {input_name: hook(input_name, x) if hook else x}
    for op in ops:
        y = run_op(op, [env[n] if n in env else consts[n] for n in op.inputs])
        env[op.outputs[0]] = hook(op.outputs[0], y) if hook else y
    return env


def dequantize_const(qm: QuantizedModel, name: str, codes: torch.Tensor | np.ndarray | None = None,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """q · scale per channel (axis 0) as float32 on `device`; `codes` replaces the stored codes."""
    t = qm.tensors[name]
    q = torch.as_tensor(t.data if codes is None else codes, device=device).to(torch.float32)
    s = torch.as_tensor(t.scale, device=device)
    return q * s.view(-1, *([1] * (q.dim() - 1)))


class Simulator:
    """Fake-quant simulation of one QuantizedModel on one device (see module docstring)."""

    def __init__(self, qm: QuantizedModel, device: str | torch.device = "cpu"):
        self.qm, self.device = qm, torch.device(device)
        self.consts = {n: dequantize_const(qm, n, device=self.device) for n, t in qm.tensors.items() if t.is_const}
        self.qparams = {n: (float(t.scale[0]), int(t.zero_point[0]), t.qmin, t.qmax)
                        for n, t in qm.tensors.items() if not t.is_const}

    def _fake_quant(self, name: str, y: torch.Tensor, codes: dict[str, torch.Tensor] | None) -> torch.Tensor:
        scale, zp, qmin, qmax = self.qparams[name]
        q = (round_half_away(y / scale) + zp).clamp(qmin, qmax)
        if codes is not None or name == self.qm.output:
            self._codes[name] = q
        return (q - zp) * scale

    @torch.no_grad()
    def forward(self, x_codes: torch.Tensor, weights: dict[str, torch.Tensor] | None = None,
                capture: bool = False) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """int8 input codes NHWC [N, H, W, C] → int8 output codes (+ every tensor's codes, NHWC, if capture)."""
        consts = self.consts
        if weights:
            consts = dict(consts)
            for name, q in weights.items():
                if name not in consts:
                    raise KeyError(f"{name!r} is not a constant of this model; keys: qm.weight_keys()")
                consts[name] = dequantize_const(self.qm, name, q, self.device)
        codes: dict[str, torch.Tensor] | None = {} if capture else None
        self._codes = {}
        s_in, zp_in, _, _ = self.qparams[self.qm.input]
        x = (_to_nchw(x_codes.to(self.device, torch.float32)) - zp_in) * s_in
        run_ops(self.qm.ops, self.qm.input, x, consts, lambda n, y: self._fake_quant(n, y, codes))
        logits = self._codes[self.qm.output].to(torch.int8)
        if not capture:
            return logits
        return logits, {n: _to_nhwc(c).to(torch.int8) for n, c in self._codes.items()}

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


def input_codes(images: np.ndarray) -> np.ndarray:
    """uint8 pixels → the QM's int8 input codes (pixel - 128)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 NHWC, got {images.dtype}")
    return (images.astype(np.int16) - 128).astype(np.int8)


def simulate(qm: QuantizedModel, images: np.ndarray, weights: dict[str, torch.Tensor] | None = None,
             capture: bool = False, device: str = "cpu", batch_size: int = 256
             ) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
    """Fake-quant run of `qm` on uint8 NHWC images: int8 logit codes (and every tensor's codes if capture)."""
    return Simulator(qm, device).run(images, weights, capture, batch_size)
