"""QuantizedModel → ExecuTorch XNNPACK int8 `.pte` (and an fp32 twin), run in the ExecuTorch runtime, and the command.

    python -m export.executorch --arch specs/tiny-mbv2.yaml    # → out/tiny-mbv2/tiny-mbv2_xnnpack.pte + report

Route (each step one function below, read top to bottom):
  1. `QMModule`: the QM's op list as a torch module, one submodule `op<i>` per QM op, NCHW, with float
     constants that are exactly the QM's numbers (w = q_w · s_w, b = q_b · s_b; BN is already folded), so the
     graph PT2E sees mirrors the integer graph op for op.
  2. `quantize`: torch.export → `prepare_pt2e(QMQuantizer)` → `convert_pt2e`. `QMQuantizer` annotates every
     node with the QM's *fixed* parameters (FixedQParams specs for activations, a fixed per-channel observer
     for weights) in the XNNPACK quantizer's layout: int8 per-tensor affine activations, int8 per-channel
     symmetric weights in [-127, 127] on axis 0, float bias (XNNPACK quantizes it to int32 with scale
     s_in · s_w while serializing, exactly the QM's bias), relu / hardtanh fused after conv / linear and relu
     after add. No calibration pass runs: nothing is observed, every q/dq carries a QM number.
     Why not the XNNPACK quantizer with overridden observers: that quantizer ties the output of `mean`
     (and of hardtanh, pools, flatten) to its input's parameters, while the QM gives `mean` its own scale and
     zero point (TFLite's MEAN requantizes, and XNNPACK's int8 global average pooling does too); with it, every
     model with a global-average-pool head would have to fail the "QM must agree" check. Annotating from
     the QM states each sharing explicitly instead (pools, pad and reshape share because the QM says so).
  3. `lower`: int8 I/O first, on the ATen program: `quantize_input` / `quantize_output` (the functions
     behind ExecuTorch's QuantizeInputs / QuantizeOutputs passes) drop the input's quantize and the output's
     dequantize, so the program takes and returns int8 codes; then `to_edge_transform_and_lower` with the
     `XnnpackPartitioner` (which keeps linear / max_pool2d / hardswish / sigmoid undecomposed for XNNPACK) →
     `to_executorch`. (After lowering, the delegate has already absorbed those q/dq nodes, see
     ../shared/EXPORT-NOTES.md; with plain `to_edge` + `to_backend`, `to_edge` decomposes linear into
     permute + addmm and max_pool2d into max_pool2d_with_indices, which stayed on the portable kernels.)
  4. `check_converted`: the converted program's q/dq parameters and int8 weights are read back and compared
     with the QM (and the int32 bias XNNPACK will derive), and the delegation summary says what, if
     anything, is left outside XNNPACK. Both go into the report.

What XNNPACK runs in int8 here: conv (regular and depthwise), linear, add, mul, mean over H, W, max pool,
relu / relu6 / 0..1 clamps, reshape. XNNPACK's ExecuTorch partitioner configs allow hardswish, sigmoid, tanh,
leaky relu, GELU (and SiLU, decomposed into sigmoid · x), average pool and constant pad in FP32 only (ExecuTorch
1.5.1: HardswishConfig, SigmoidConfig, TanhConfig, LeakyReLUConfig, GeluConfig, AvgPoolingConfig, ConstantPadConfig; the
bundled XNNPACK has no int8 average pooling at all, "Average Pooling (NHWC, F16/F32)" only): they run inside
the same delegate in fp32 between XNNPACK convert ops (dequantize → op → quantize with the QM's parameters).
The report counts them under `writer.delegation.fp32_inside_delegate` ({op: count}; a conv's explicit
asymmetric padding counts as a pad). That arithmetic is not TFLite's int8 HARD_SWISH / AVERAGE_POOL_2D:
the runner declares arithmetic "executorch", and verification holds it to `simulate(rounding="executorch")`,
which computes exactly those float32 ops (calibration/sim.py `et_*`; measured code for code per op). Pad is
exact either way (a code's float32 round trip returns the code).

The `.pte` input is int8 NCHW [1, C, H, W] (the QM's input codes, pixel − 128, channel-first); the output is
the QM's int8 logit codes. The fp32 twin (`<name>_fp32.pte`) is the same module unquantized, lowered to
XNNPACK in fp32, input pixel / 255 NCHW: the latency baseline.
"""

from __future__ import annotations

import argparse
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torchao.quantization.pt2e.observer import ObserverBase
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer import (
    FixedQParamsQuantizationSpec,
    QuantizationAnnotation,
    QuantizationSpec,
    Quantizer,
)
from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY
from torchvision.models.shufflenetv2 import channel_shuffle

from calibration.qmodel import CLAMP_OPS, TABLE_OPS, WEIGHTED_OPS, Op, QuantizedModel
from calibration.sim import table_function
from export.pipeline import Built, add_common_args, check_requantization, run_export, runtime_refusal
from export.verify import Runners
from ghnq.cli import UserError, drop_native_log_lines, run_cli
from ghnq.fileio import atomic_write_bytes
from ghnq.graph import pool_size

SUPPORTED = (*WEIGHTED_OPS, "add", "sub", "mul", "mean", "max_pool2d", "avg_pool2d", *TABLE_OPS, *CLAMP_OPS,
             "resize_nearest", "pad", "reshape", "concat", "gather", "softmax")
# XNNPACK's ExecuTorch partitioner lowers these only in fp32: inside the delegate they run between convert ops.
# (SiLU has no config of its own: to_edge decomposes it into sigmoid and mul, both delegated, in fp32.)
# ELU has a config, but ExecuTorch 1.5.1 leaves it out of the partitioner's list ("Waiting for PyTorch Pin
# Update"): it runs on the portable kernels between two delegate partitions, in float32 on the dequantized codes,
# and returns the table's codes exactly (measured: 0 of 1,536 codes differ, tests/test_export_executorch.py).
# Mish and Softplus have no XNNPACK config, and to_edge decomposes them (softplus: where(beta·x > threshold, x,
# log1p(exp(beta·x)) / beta)). Left in float32, XNNPACK takes the exp / mul / tanh and ExecuTorch 1.5.1's
# ChannelsLastTaggedReshapePass fails on a softplus after a conv (KeyError 'val', measured). So they run whole on
# the portable kernels in float64 between the delegate's dequantize and quantize (XNNPACK takes no float64
# op): the float32 cast of that is the correctly rounded float32 value, which is exactly calibration.sim.et_table.
# A hardtanh with its own output scale runs there too: XNNPACK's clamp config would take it as an int8 clamp,
# which keeps its input's scale.
# So do SELU, CELU and Softsign, which XNNPACK has no config for either.
FLOAT64_PORTABLE = ("mish", "softplus", "hardtanh", "selu", "celu", "softsign")
OUTSIDE_DELEGATE = ("elu", *FLOAT64_PORTABLE)
FP32_ONLY = (*(k for k in TABLE_OPS if k not in OUTSIDE_DELEGATE), "avg_pool2d", "pad")
# Compute ops that must end up inside the XNNPACK delegate (edge-dialect op names of get_delegation_info).
MUST_DELEGATE = ("aten_convolution_default", "aten_linear_default", "aten_add_tensor", "aten_sub_tensor",
                 "aten_mul_tensor",
                 "aten_mean_dim", "aten_max_pool2d_default", "aten_avg_pool2d_default",
                 "aten_max_pool2d_with_indices_default", "aten_hardswish_default", "aten_sigmoid_default",
                 "aten_tanh_default", "aten_leaky_relu_default", "aten_gelu_default", "aten_relu_default",
                 "aten_prelu_default",
                 "aten_hardtanh_default")
ACT_MIN, ACT_MAX, W_MIN, W_MAX = -128, 127, -127, 127  # XNNPACK's int8 ranges (activations, weights)


def _where(i: int, op: Op) -> str:
    return f"op {i} ({op.kind} from {op.source or '?'})"


def check_supported(qm: QuantizedModel) -> None:
    """Everything the writer needs from a QM, checked before any byte is written (UserError)."""
    qm.validate()
    check_requantization(qm)
    if len(qm.tensors[qm.input].shape) != 4:
        raise UserError(f"input {qm.input!r}: shape {qm.tensors[qm.input].shape}; the writer needs NHWC 4-D input")
    for i, op in enumerate(qm.ops):
        if op.kind not in SUPPORTED:
            raise UserError(f"{_where(i, op)}: no ExecuTorch/XNNPACK mapping for op kind {op.kind!r}; "
                            f"supported: {', '.join(SUPPORTED)}")
        for name in op.inputs + op.outputs:
            t = qm.tensors[name]
            if not t.is_const and (t.bits != 8 or len(t.scale) != 1 or t.dtype != "int8"):
                raise UserError(f"{_where(i, op)}: tensor {name!r} is {t.bits}-bit/{len(t.scale)}-scale; XNNPACK "
                                "needs 8-bit per-tensor activations (calibrate with --act-bits 8)")
            if not t.is_const and not ACT_MIN <= int(t.zero_point[0]) <= ACT_MAX:
                raise UserError(f"{_where(i, op)}: tensor {name!r} zero point {int(t.zero_point[0])} outside int8")
        if op.kind in WEIGHTED_OPS:
            w, b = qm.tensors[op.inputs[1]], qm.tensors[op.inputs[2]]
            if np.any(w.zero_point != 0) or w.axis not in (0, None) or len(w.scale) != w.data.shape[0]:
                raise UserError(f"{_where(i, op)}: weight {op.inputs[1]!r} must be symmetric per-channel on axis 0")
            if int(np.abs(w.data.astype(np.int32)).max(initial=0)) > W_MAX:
                raise UserError(f"{_where(i, op)}: weight {op.inputs[1]!r} has codes outside [-127, 127]")
            if b.dtype != "int32" or np.any(b.zero_point != 0):
                raise UserError(f"{_where(i, op)}: bias {op.inputs[2]!r} must be int32 with zero point 0")
        if op.kind == "mean" and list(op.attrs.get("axes", [1, 2])) != [1, 2]:
            raise UserError(f"{_where(i, op)}: mean over axes {op.attrs['axes']}; XNNPACK averages H, W only")
        if op.kind in ("max_pool2d", "avg_pool2d"):
            k, s = op.attrs["kernel"], op.attrs["stride"]
            if op.kind == "max_pool2d" and (s[0] > k[0] or s[1] > k[1]):
                raise UserError(f"{_where(i, op)}: max pool stride {s} > kernel {k}; XNNPACK needs stride ≤ kernel")
            _pool_padding(op, qm.tensors[op.inputs[0]].shape[1:3], qm.tensors[op.outputs[0]].shape[1:3])
        if op.kind == "reshape" and not (len(op.attrs["shape"]) == 2 or op.attrs["shape"][:3] == [1, 1, 1]):
            raise UserError(f"{_where(i, op)}: reshape to {op.attrs['shape']}; supported: [1, C] (flatten) and "
                            "[1, 1, 1, C]")


def _pool_padding(op: Op, in_hw: list[int], out_hw: list[int]) -> tuple[int, int, bool]:
    """(top, left, ceil_mode) of the torch pool computing the QM's: symmetric padding, or for a max pool more at
    the bottom/right when torch's ceil mode gives exactly the QM's output size (torch leaves the overhang out of
    the max, as the QM does its padding). Not for an average: XNNPACK delegates no ceil-mode one, and the
    portable kernel's float sum order is not the delegate's, which the sim models. Raises otherwise."""
    t, b, left, r = op.attrs.get("padding", [0, 0, 0, 0])
    k, s = op.attrs["kernel"], op.attrs["stride"]
    if 2 * t <= k[0] and 2 * left <= k[1]:
        if t == b and left == r:
            return t, left, False
        sizes = zip(in_hw, k, s, (t, left), out_hw, strict=True)
        if op.kind == "max_pool2d" and b >= t and r >= left and all(
                pool_size(n, {"kernel_size": kk, "stride": st, "padding": p, "ceil_mode": True}) == o
                for n, kk, st, p, o in sizes):
            return t, left, True
    raise UserError(f"{op.kind} ({op.source or '?'}): padding {op.attrs['padding']} is not expressible as "
                    "torch's pool padding (symmetric, ≤ kernel / 2; a max pool also with a ceil-mode overhang)")


# ----------------------------------------------------------------------------------------------------
# 1. The QM's op list as a torch module (NCHW, exact float constants)


def _dequantized(qm: QuantizedModel, name: str) -> torch.Tensor:
    """q · s per output channel in float32: PT2E re-quantizes it to exactly q (|q| ≤ 127, or a bias code)."""
    t = qm.tensors[name]
    s = torch.from_numpy(np.asarray(t.scale, np.float32))
    q = torch.from_numpy(np.asarray(t.data)).to(torch.float32)
    return q * s.view(-1, *([1] * (q.dim() - 1)))


def gather_form(indices: list[int], c_in: int) -> tuple[str, int, int]:
    """How a channel gather runs in ExecuTorch, preferring what XNNPACK delegates (measured, ExecuTorch 1.5.1:
    static slice, reshape and transpose run in the delegate in int8; index_select stays on the portable kernels,
    between delegate partitions, exact on the dequantized codes):
    ("slice", a, b) for channels a..b-1; ("shuffle", g, 0) for a g-group channel shuffle (view [g, C/g] →
    transpose → view, ShuffleNet's); ("index", 0, 0) for anything else."""
    a = indices[0]
    if indices == list(range(a, a + len(indices))):
        return "slice", a, a + len(indices)
    if len(indices) == c_in:
        for g in range(2, c_in):
            if c_in % g == 0 and indices == [j * (c_in // g) + i for i in range(c_in // g) for j in range(g)]:
                return "shuffle", g, 0
    return "index", 0, 0


class OpModule(nn.Module):
    """One QM op. Node chain per op: [pad] → compute → [activation] → [reshape] (see QMQuantizer); a gather is
    a chain of data-movement nodes."""

    def __init__(self, qm: QuantizedModel, op: Op, fp32: bool = False) -> None:
        super().__init__()
        self.kind, self.attrs, self.fp32 = op.kind, dict(op.attrs), fp32
        if op.kind in WEIGHTED_OPS:
            self.weight = nn.Parameter(_dequantized(qm, op.inputs[1]), requires_grad=False)
            self.bias = nn.Parameter(_dequantized(qm, op.inputs[2]), requires_grad=False)
        if op.kind in ("max_pool2d", "avg_pool2d"):
            self.pool_padding = _pool_padding(op, qm.tensors[op.inputs[0]].shape[1:3],
                                              qm.tensors[op.outputs[0]].shape[1:3])
        if op.kind == "softmax":
            self.in_scale, self.in_zp = (float(v) for v in qm.tensors[op.inputs[0]].qparams)
            self.register_buffer("exp_table", torch.tensor(op.attrs["exp_table"], dtype=torch.int64))
        if op.kind == "prelu":  # XNNPACK's PReLU config takes the slopes only as a parameter, in fp32
            self.alpha = nn.Parameter(torch.tensor(op.attrs["alpha"], dtype=torch.float32), requires_grad=False)
        if op.kind == "gather":
            self.form = gather_form(op.attrs["indices"], qm.tensors[op.inputs[0]].shape[-1])
            self.register_buffer("indices", torch.tensor(op.attrs["indices"], dtype=torch.int64))

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        a, k = self.attrs, self.kind
        x = xs[0]
        if k in ("conv2d", "depthwise_conv2d"):
            t, b, left, r = a["padding"]
            if t != b or left != r:  # asymmetric: an explicit pad (real 0 = the zero point), then VALID
                x, pad = F.pad(x, (left, r, t, b)), (0, 0)
            else:
                pad = (t, left)
            groups = x.shape[1] // self.weight.shape[1]  # 1, grouped, or depthwise
            y = F.conv2d(x, self.weight, self.bias, a["stride"], pad, a.get("dilation", [1, 1]), groups)
        elif k == "fully_connected":
            y = F.linear(x, self.weight, self.bias)
        elif k == "add":
            y = x + xs[1]
        elif k == "sub":
            y = x - xs[1]
        elif k == "mul":
            y = x * xs[1]
        elif k == "mean":
            y = x.mean(dim=(2, 3), keepdim=True)  # XNNPACK's global average pool needs keepdim
        elif k == "max_pool2d":
            t, left, ceil = self.pool_padding
            y = F.max_pool2d(x, a["kernel"], a["stride"], (t, left), ceil_mode=ceil)
        elif k == "avg_pool2d":
            # the QM divides by the in-range positions: torch's count_include_pad=False
            t, left, ceil = self.pool_padding
            y = F.avg_pool2d(x, a["kernel"], a["stride"], (t, left), ceil_mode=ceil, count_include_pad=False)
        elif k in FLOAT64_PORTABLE:
            y = table_function(k, a)(x.double()).float()
        elif k == "prelu":
            y = F.prelu(x, self.alpha)
        elif k == "softmax" and self.fp32:  # the float twin: torch's softmax (XNNPACK's, in the delegate)
            y = F.softmax(x, dim=-1)
        elif k == "softmax":
            # calibration.reference.softmax on the portable kernels: the codes back from the dequantized input (in
            # float64, which XNNPACK does not take; exact: |q − zp| ≤ 255), integer steps in int64, then the real
            # value (y + 128) / 256, which the output quantize (1/256, −128) maps back to y exactly
            q = (torch.round(x.double() / self.in_scale) + self.in_zp).long()
            e = self.exp_table[q - q.amax(dim=-1, keepdim=True) + 255]
            total = e.sum(dim=-1, keepdim=True)
            ratio = torch.div(e * 256 + torch.div(total, 2, rounding_mode="floor"), total, rounding_mode="floor")
            y = ((ratio - 128).clamp(max=127) + 128).double().div(256).float()
        elif k in TABLE_OPS:
            y = table_function(k, a)(x)
        elif k in CLAMP_OPS:
            y = x  # a standalone relu / relu6: the activation below, by its kind
        elif k == "resize_nearest":
            # XNNPACK's partitioner has no nearest resize: upsample_nearest2d runs on the portable kernels between
            # delegate partitions, on the dequantized codes, a copy (its float32 index is TFLite's, see
            # reference.nearest_source_index)
            y = F.interpolate(x, size=(x.shape[2] * a["factor"][0], x.shape[3] * a["factor"][1]), mode="nearest")
        elif k == "pad":
            t, b, left, r = a["padding"]
            y = F.pad(x, (left, r, t, b))
        elif k == "concat":
            y = torch.cat(xs, dim=1)  # channels (NCHW dim 1)
        elif k == "gather":
            form, p, q = self.form
            if form == "slice":
                y = x[:, p:q]
            elif form == "shuffle":
                y = channel_shuffle(x, p)
            else:
                y = x.index_select(1, self.indices)
        elif k == "reshape":
            if x.dim() == 4:  # the QM flattens NHWC (what TFLite's RESHAPE does): H, W, C order
                x = x.permute(0, 2, 3, 1)
            shape = a["shape"][1:] if len(a["shape"]) == 2 else [a["shape"][3], 1, 1]  # [1, 1, 1, C]: NCHW here
            y = x.reshape(x.shape[0], *shape)
        else:
            raise ValueError(k)
        fused = k if k in CLAMP_OPS else a.get("fused", "none")
        if fused == "relu":
            y = F.relu(y)
        elif fused == "relu6":
            y = F.hardtanh(y, 0.0, 6.0)
        elif fused == "relu_0_to_1":
            y = F.hardtanh(y, 0.0, 1.0)
        if k == "mean" and not a.get("keepdims", True):
            y = y.reshape(y.shape[0], y.shape[1])
        return y


class QMModule(nn.Module):
    """The whole QM: input NCHW float (the real value of the int8 input, pixel / 255) → logits."""

    def __init__(self, qm: QuantizedModel, fp32: bool = False) -> None:
        super().__init__()
        self.ops = [(op, [n for n in op.inputs if not qm.tensors[n].is_const]) for op in qm.ops]
        self.input, self.output = qm.input, qm.output
        for i, op in enumerate(qm.ops):
            self.add_module(f"op{i}", OpModule(qm, op, fp32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {self.input: x}
        for i, (op, acts) in enumerate(self.ops):
            env[op.outputs[0]] = getattr(self, f"op{i}")(*[env[n] for n in acts])
        return env[self.output]


def example_input(qm: QuantizedModel) -> torch.Tensor:
    _, h, w, c = qm.tensors[qm.input].shape
    return torch.zeros(1, c, h, w)


# ----------------------------------------------------------------------------------------------------
# 2. PT2E with the QM's parameters


def _op_index(node: fx.Node) -> int | None:
    """Which QM op a node of the exported graph came from (its innermost `op<i>` module)."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        m = re.search(r"(?:^|\.)op(\d+)$", str(path))
        if m:
            return int(m.group(1))
    return None


def _op_chains(gm: fx.GraphModule) -> dict[int, list[fx.Node]]:
    chains: dict[int, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function":
            i = _op_index(n)
            if i is None:
                raise RuntimeError(f"exported node {n.name} ({n.target}) belongs to no QM op")
            chains.setdefault(i, []).append(n)
    return chains


def _target_name(n: fx.Node) -> str:
    return getattr(n.target, "__name__", str(n.target)).split(".")[0]


ACTIVATIONS = ("relu", "hardtanh", "relu_", "hardtanh_")
PADS = ("pad", "constant_pad_nd")
RESHAPES = ("reshape", "view", "view_copy", "flatten")


def _chain_roles(op: Op, chain: list[fx.Node]) -> list[str]:
    """Role of each node of an op's chain: pad, compute, act or reshape (the q/dq layout depends on it)."""
    if op.kind == "gather":  # slice, or view → transpose → view, or index_select: each node copies codes
        return ["move"] * len(chain)
    if op.kind in (*FLOAT64_PORTABLE, "softmax"):  # float64 / int64 steps: quantized only at the ends
        return ["compute"] + ["inner"] * (len(chain) - 1)
    roles, seen_compute = [], False
    for n in chain:
        name = _target_name(n)
        if not seen_compute and name in PADS and op.kind != "pad":
            roles.append("pad")
        elif not seen_compute:
            roles.append("compute")
            seen_compute = True
        elif name in ACTIVATIONS:
            roles.append("act")
        elif name in RESHAPES:
            roles.append("reshape")
        else:
            raise RuntimeError(f"{op.kind}: unexpected node {n.name} ({n.target}) in the exported graph")
    return roles


class FixedPerChannelObserver(ObserverBase):
    """Returns the QM's per-channel weight scales (zero point 0) and observes nothing. ("PerChannel" in the
    class name makes PT2E hand ch_axis to it.)"""

    def __init__(self, scale: list[float], dtype: torch.dtype = torch.int8,
                 qscheme: torch.qscheme = torch.per_channel_symmetric, quant_min: int = W_MIN,
                 quant_max: int = W_MAX, ch_axis: int = 0, is_dynamic: bool = False, **_: Any) -> None:
        super().__init__(dtype=dtype, is_dynamic=False)
        self.qscheme, self.quant_min, self.quant_max, self.ch_axis = qscheme, quant_min, quant_max, ch_axis
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("zero_point", torch.zeros(len(scale), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale, self.zero_point


class QMQuantizer(Quantizer):
    """A PT2E quantizer whose every annotation is a number from the QM.

    Per op chain [pad] → compute → [act] → [reshape]: the chain's first node takes the QM input tensors'
    parameters on its inputs; each node's output gets the QM output tensor's parameters, except a compute
    node followed by its fused activation (conv / linear + relu / hardtanh, add + relu: XNNPACK fuses these
    patterns, so no q/dq sits between them) and an explicit pad (its input's parameters: padding with real 0).
    One spec object per QM tensor: PT2E gives equal specs of producer and consumer one shared q/dq pair.
    """

    def __init__(self, qm: QuantizedModel) -> None:
        super().__init__()
        self.qm = qm
        self.specs: dict[str, FixedQParamsQuantizationSpec] = {}

    def act(self, name: str) -> FixedQParamsQuantizationSpec:
        if name not in self.specs:
            t = self.qm.tensors[name]
            self.specs[name] = FixedQParamsQuantizationSpec(
                dtype=torch.int8, scale=float(np.float32(t.scale[0])), zero_point=int(t.zero_point[0]),
                quant_min=ACT_MIN, quant_max=ACT_MAX, qscheme=torch.per_tensor_affine)
        return self.specs[name]

    def weight(self, name: str) -> QuantizationSpec:
        scale = [float(s) for s in np.asarray(self.qm.tensors[name].scale, np.float32)]
        return QuantizationSpec(dtype=torch.int8, quant_min=W_MIN, quant_max=W_MAX, qscheme=torch.per_channel_symmetric,
                                ch_axis=0, observer_or_fake_quant_ctr=FixedPerChannelObserver.with_args(scale=scale))

    def annotate(self, gm: fx.GraphModule) -> fx.GraphModule:
        for i, chain in _op_chains(gm).items():
            op = self.qm.ops[i]
            roles = _chain_roles(op, chain)
            acts = [n for n in op.inputs if not self.qm.tensors[n].is_const]
            fuse = op.kind in WEIGHTED_OPS or (op.kind == "add" and op.attrs.get("fused") == "relu")
            prev, prev_spec = None, None
            for n, role in zip(chain, roles, strict=True):
                imap: dict[fx.Node, Any] = {}
                if prev is None:
                    args = n.args[0] if op.kind == "concat" and role == "compute" else n.args  # cat(list, dim)
                    imap.update({arg: self.act(name) for arg, name in zip(args, acts, strict=False)})
                elif prev_spec is not None:
                    imap[prev] = prev_spec
                if role == "compute" and op.kind in WEIGHTED_OPS:
                    imap[n.args[1]] = self.weight(op.inputs[1])  # the bias stays float: XNNPACK derives it
                if role == "pad":
                    out = self.act(acts[0])
                elif role == "inner" and n is not chain[-1] or role == "compute" and (
                        "inner" in roles or fuse and "act" in roles):
                    out = None
                else:
                    out = self.act(op.outputs[0])
                n.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map=imap, output_qspec=out,
                                                                  _annotated=True)
                prev, prev_spec = n, out
        return gm

    def validate(self, gm: fx.GraphModule) -> None:
        pass


def quantize(qm: QuantizedModel) -> fx.GraphModule:
    """The converted PT2E program: q/dq nodes with the QM's parameters, int8 weights folded."""
    x = example_input(qm)
    gm = torch.export.export(QMModule(qm).eval(), (x,), strict=False).module()
    for n in list(gm.graph.nodes):  # export's dtype checks beside a float64 op's casts: no value, and one on the
        if n.target is torch.ops.aten._assert_tensor_metadata.default:  # input would be a second user of it
            gm.graph.erase_node(n)
    gm.recompile()
    prepared = prepare_pt2e(gm, QMQuantizer(qm))  # no calibration pass: every observer is fixed
    return convert_pt2e(prepared)


# ----------------------------------------------------------------------------------------------------
# 3. Lowering to XNNPACK and the .pte bytes


@dataclass
class Program:
    data: bytes
    delegation: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)


def _delegation(gm: fx.GraphModule) -> dict[str, Any]:
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(gm)
    by_op = {k: {"delegated": v.delegated, "not_delegated": v.non_delegated}
             for k, v in sorted(info.delegation_by_operator.items())}
    outside = {k: v["not_delegated"] for k, v in by_op.items() if v["not_delegated"] and k != "getitem"}
    # a float64 or int64 node is part of a FLOAT64_PORTABLE table op (mish's mul) or of the integer softmax by
    # construction: not a compute op left out of the delegate
    table_parts = Counter(re.sub(r"_\d+$", "", n.name) for n in gm.graph.nodes if n.op == "call_function"
                          and getattr(n.meta.get("val"), "dtype", None) in (torch.float64, torch.int64))
    return {"delegated_subgraphs": info.num_delegated_subgraphs, "delegated_nodes": info.num_delegated_nodes,
            "not_delegated_nodes": info.num_non_delegated_nodes, "by_operator": by_op,
            "outside_delegate": outside,
            "compute_outside_delegate": {k: v - table_parts[k] for k, v in outside.items()
                                         if k in MUST_DELEGATE and v > table_parts[k]}}


def lower(qm: QuantizedModel, fp32: bool = False) -> Program:
    """The `.pte` bytes: int8 I/O with the QM's parameters, or (fp32) the float twin; both XNNPACK."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.exir.passes.quantize_io_pass import quantize_input, quantize_output

    check_supported(qm)
    x, times, t0 = example_input(qm), {}, time.perf_counter()
    if fp32:
        ep = torch.export.export(QMModule(qm, fp32=True).eval(), (x,), strict=False)
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
        times["export+lower"] = time.perf_counter() - t0
    else:
        converted = quantize(qm)
        check_converted(qm, converted)
        times["pt2e"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ep = torch.export.export(converted, (x,), strict=False)
        # int8 I/O: drop the input's quantize and the output's dequantize on the ATen program, before
        # lowering (after it, the delegate has absorbed them); the parameters go into the .pte as ExecuTorch's
        # conventional config methods (forward_input0_scale, ...), so a runtime can read them.
        io = {**_io_methods("input", quantize_input(ep, 0)), **_io_methods("output", quantize_output(ep, 0))}
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()], constant_methods=io)
        times["lower"] = time.perf_counter() - t0
    delegation = _delegation(edge.exported_program().graph_module)
    delegation["fp32_inside_delegate"] = {} if fp32 else fp32_inside_delegate(qm)
    t0 = time.perf_counter()
    data = bytes(edge.to_executorch().buffer)
    times["serialize"] = time.perf_counter() - t0
    return Program(data, delegation, {k: round(v, 3) for k, v in times.items()})


def fp32_inside_delegate(qm: QuantizedModel) -> dict[str, int]:
    """{op kind: count} of the QM ops the int8 program runs as dequantize → fp32 op → quantize in the delegate."""
    counts: dict[str, int] = {}
    for op in qm.ops:
        kind = op.kind if op.kind in FP32_ONLY else None
        if op.kind in ("conv2d", "depthwise_conv2d"):
            t, b, left, r = op.attrs["padding"]
            kind = "pad" if t != b or left != r else None  # the conv's explicit pad (see OpModule)
        if kind:
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


def _io_methods(kind: str, args: tuple) -> dict[str, Any]:
    """(scale, zp, qmin, qmax, dtype) of the I/O quantization → ExecuTorch's config-method names and values."""
    from executorch.exir.passes.quantize_io_pass import get_config_method_name
    from executorch.exir.tensor import scalar_type_enum

    keys = ("scale", "zp", "quant_min", "quant_max", "dtype")
    vals = (float(args[0]), int(args[1]), int(args[2]), int(args[3]), scalar_type_enum(args[4]))
    return {get_config_method_name("forward", kind, 0, k): v for k, v in zip(keys, vals, strict=True)}


# ----------------------------------------------------------------------------------------------------
# 4. Reading the parameters back from the converted program


@dataclass
class ProgramParams:
    """What the converted program carries, by QM tensor name."""

    activations: dict[str, tuple[float, int]]  # tensor → (scale, zero point) of its quantize node
    weights: dict[str, tuple[np.ndarray, np.ndarray]]  # weight → (int8 codes, float32 per-channel scales)
    biases: dict[str, np.ndarray]  # bias → the int32 codes XNNPACK derives from the float bias
    dequant_mismatch: list[str]  # dq nodes whose parameters differ from their q node's


def _const(gm: fx.GraphModule, n: Any) -> Any:
    if isinstance(n, fx.Node) and n.op == "get_attr":
        obj = gm
        for part in str(n.target).split("."):
            obj = getattr(obj, part)
        return obj
    return n


def read_params(qm: QuantizedModel, gm: fx.GraphModule) -> ProgramParams:
    qd = torch.ops.quantized_decomposed
    q_ops = (qd.quantize_per_tensor.default, qd.quantize_per_tensor.tensor)
    dq_ops = (qd.dequantize_per_tensor.default, qd.dequantize_per_tensor.tensor)
    chains = _op_chains_converted(gm)
    acts: dict[str, tuple[float, int]] = {}
    weights: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    float_biases: dict[int, torch.Tensor] = {}
    mismatch: list[str] = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in q_ops:
            name = _tensor_of(qm, n.args[0], chains)
            val = (float(_const(gm, n.args[1])), int(_const(gm, n.args[2])))
            if name in acts and acts[name] != val:
                mismatch.append(f"{name}: two quantize nodes {acts[name]} and {val}")
            acts.setdefault(name, val)
            for user in n.users:
                if user.target in dq_ops and (float(_const(gm, user.args[1])), int(_const(gm, user.args[2]))) != val:
                    mismatch.append(f"{name}: dequantize {user.name} differs from its quantize node")
        elif n.target == qd.dequantize_per_channel.default:
            user = next(iter(n.users))
            i = _op_index(user)
            codes = _const(gm, n.args[0]).detach().numpy()
            scale = _const(gm, n.args[1]).detach().numpy().astype(np.float32)
            weights[qm.ops[i].inputs[1]] = (codes, scale)
            bias = _const(gm, user.args[2]) if len(user.args) > 2 else None
            if isinstance(bias, torch.Tensor):
                float_biases[i] = bias.detach()
    # the int32 bias XNNPACK will serialize, from the program's own input and weight scales
    biases = {}
    for i, bias in float_biases.items():
        op = qm.ops[i]
        if op.inputs[0] in acts:
            biases[op.inputs[2]] = xnnpack_bias_codes(bias, torch.from_numpy(weights[op.inputs[1]][1]),
                                                      acts[op.inputs[0]][0])
    return ProgramParams(acts, weights, biases, mismatch)


def xnnpack_bias_codes(bias: torch.Tensor, w_scale: torch.Tensor, in_scale: float) -> np.ndarray:
    """The int32 bias XNNPACK serializes for a float bias: scale = s_w · s_in in float32 (QuantParams.from_bias),
    quantized by quantize_per_channel (round half to even of b · (1 / scale)) — the same two calls."""
    scale = w_scale.to(torch.float32) * float(in_scale)
    q = torch.ops.quantized_decomposed.quantize_per_channel.default(
        bias.to(torch.float32), scale, torch.zeros_like(scale, dtype=torch.int64), 0, -(2 ** 31), 2 ** 31 - 1,
        torch.int32)
    return q.numpy()


def _op_chains_converted(gm: fx.GraphModule) -> dict[int, list[fx.Node]]:
    chains: dict[int, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and "quantized_decomposed" not in str(n.target):
            i = _op_index(n)
            if i is not None:
                chains.setdefault(i, []).append(n)
    return chains


def _tensor_of(qm: QuantizedModel, src: Any, chains: dict[int, list[fx.Node]]) -> str:
    """QM tensor name of the value a quantize node quantizes."""
    if isinstance(src, fx.Node) and src.op == "placeholder":
        return qm.input
    i = _op_index(src) if isinstance(src, fx.Node) else None
    if i is None:
        return f"<unknown {src}>"
    op = qm.ops[i]
    if _target_name(src) in PADS and op.kind != "pad" and chains[i] and chains[i][0] is src:
        return f"{op.outputs[0]}/pad"  # a conv's explicit pad: carries its input's parameters
    return op.outputs[0]


def check_converted(qm: QuantizedModel, gm: fx.GraphModule) -> ProgramParams:
    """Every q/dq parameter, int8 weight and derived int32 bias of the converted program equals the QM's."""
    p = read_params(qm, gm)
    errors = list(p.dequant_mismatch)
    for name, t in qm.tensors.items():
        if t.is_const:
            continue
        want = (float(np.float32(t.scale[0])), int(t.zero_point[0]))
        got = p.activations.get(name)
        if got is None:
            errors.append(f"{name}: no quantize node")
        elif got != want:
            errors.append(f"{name}: program {got}, QM {want}")
    for op in qm.ops:  # a conv's explicit pad keeps its input's parameters
        pad = p.activations.get(f"{op.outputs[0]}/pad")
        if pad is not None and pad != p.activations.get(op.inputs[0]):
            errors.append(f"{op.outputs[0]}/pad: parameters {pad} differ from its input's")
    for op in qm.ops:
        if op.kind not in WEIGHTED_OPS:
            continue
        w, b = qm.tensors[op.inputs[1]], qm.tensors[op.inputs[2]]
        if op.inputs[1] not in p.weights:
            errors.append(f"{op.inputs[1]}: no per-channel dequantize node")
            continue
        codes, scale = p.weights[op.inputs[1]]
        if codes.dtype != np.int8 or not np.array_equal(codes, w.data):
            errors.append(f"{op.inputs[1]}: int8 weights differ from the QM's")
        if scale.tobytes() != np.asarray(w.scale, np.float32).tobytes():
            errors.append(f"{op.inputs[1]}: per-channel scales differ from the QM's")
        if op.inputs[2] not in p.biases or not np.array_equal(p.biases[op.inputs[2]], b.data):
            errors.append(f"{op.inputs[2]}: the int32 bias XNNPACK derives differs from the QM's")
    if errors:
        raise RuntimeError("the converted PT2E program does not carry the QuantizedModel's parameters: "
                           + "; ".join(errors[:5]) + (f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""))
    return p


def write_pte(qm: QuantizedModel, path: str | Path, fp32: bool = False) -> tuple[Path, Program]:
    """Build in memory (all checks first), then write atomically."""
    prog = lower(qm, fp32)
    return atomic_write_bytes(path, prog.data), prog


# ----------------------------------------------------------------------------------------------------
# Running a .pte in the ExecuTorch runtime


def _executorch_version() -> str:
    from importlib.metadata import version

    return version("executorch")


class ExecuTorchRunner:
    """A `.pte` in the ExecuTorch runtime (Python bindings), one image per call (the program's batch is 1).

    Takes the QM's int8 input codes NHWC [N, H, W, C] like every runner (export/verify.py) and feeds them
    channel-first; `fp32` programs get the real value (q − zp) · s of those codes.
    """

    def __init__(self, program: bytes | str | Path, threads: int = 1, fp32_input: tuple[float, int] | None = None
                 ) -> None:
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        # the runtime probes the CPU and logs each step and every thread-pool reset at its first use
        with drop_native_log_lines(r"\[(cpuinfo_utils|threadpool)\.cpp:\d+\] "):
            portable_lib._unsafe_reset_threadpool(threads)  # XNNPACK's thread pool (a private hook in 1.x)
            # the runtime reads a bytes program in place without holding a reference: this object keeps it alive
            self._program_bytes = program if isinstance(program, bytes) else None
            data = self._program_bytes if self._program_bytes is not None else Path(program)
            self.method = Runtime.get().load_program(data).load_method("forward")
        self.fp32_input = fp32_input
        kind = "fp32" if fp32_input else "int8"
        self.name = (f"ExecuTorch {_executorch_version()} XNNPACK ({kind}, {threads} thread{'s' * (threads > 1)})")
        # XNNPACK's int8 kernels (as LiteRT's default delegate), except the table ops / avg pool / pad, which run in
        # fp32 inside this delegate: export.verify holds it to simulate(rounding="executorch")
        self.arithmetic = "executorch"

    def prepare(self, x: np.ndarray) -> list[torch.Tensor]:
        """NHWC int8 codes → the program's inputs, one [1, C, H, W] tensor per image."""
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        if self.fp32_input is not None:
            s, zp = self.fp32_input
            x = ((x.astype(np.float32) - zp) * np.float32(s)).astype(np.float32)
        return [torch.from_numpy(x[i:i + 1]) for i in range(len(x))]

    def invoke(self, t: torch.Tensor) -> torch.Tensor:
        return self.method.execute([t])[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.stack([self.invoke(t).numpy()[0] for t in self.prepare(x)])


# ----------------------------------------------------------------------------------------------------
# The command


def build(qm: QuantizedModel, out_dir: Path, name: str, args: argparse.Namespace) -> Built:
    """Writer for the pipeline: both programs built (and so checked) in memory and loaded in the runtime, then
    written atomically — a program the runtime refuses is never written."""
    int8, fp32 = lower(qm), lower(qm, fp32=True)
    t = qm.tensors[qm.input]
    with runtime_refusal("the ExecuTorch runtime"):
        runners = Runners(runner=ExecuTorchRunner(int8.data, args.threads),
                          float_runners=[ExecuTorchRunner(fp32.data, args.threads, t.qparams)])
    p8 = atomic_write_bytes(out_dir / f"{name}_xnnpack.pte", int8.data)
    p32 = atomic_write_bytes(out_dir / f"{name}_fp32.pte", fp32.data)
    info = {"route": "QM → torch module → PT2E (QM-fixed quantizer) → quantize_input/output → "
                     "to_edge_transform_and_lower(XnnpackPartitioner)", "executorch": _executorch_version(),
            "delegation": int8.delegation, "fp32_delegation": fp32.delegation,
            "seconds": {"int8": int8.seconds, "fp32": fp32.seconds}}
    if int8.delegation["compute_outside_delegate"]:
        import sys

        print(f"WARNING: {name}: left outside the XNNPACK delegate (portable kernels): "
              f"{int8.delegation['compute_outside_delegate']}", file=sys.stderr)
    return Built(artifact=p8, runners=runners, artifacts={"int8": p8, "fp32": p32}, info=info)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.executorch", description=__doc__.split("\n\n")[0] + "\n\n"
                                "Writes OUT/<name>_xnnpack.pte (int8 I/O), <name>_fp32.pte, <name>.qm, report.json, "
                                "report.md, plots and verify/ (the device bundle's inputs and expected outputs).",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    args = p.parse_args(argv)
    if args.per_layer:  # refused before any work: nothing here could produce it
        raise UserError("--per-layer: the XNNPACK delegate hides the intermediate tensors of a .pte; run "
                        "`python -m export.tflite --per-layer` for per-layer codes of the same QM")
    return run_export(args, "executorch", build)


if __name__ == "__main__":
    run_cli(main)
