"""QuantizedModel → integer-only int8 `.tflite` (and an fp32 twin), run in LiteRT, and the main command.

    python -m export.tflite --arch specs/tiny-mbv2.yaml          # → out/tiny-mbv2/tiny-mbv2_int8.tflite + report

Why we write the flatbuffer ourselves: TFLite's converter and onnx2tf both run their own calibration (a
representative dataset → their own ranges), so the scales, zero points, int8 weights and int32 biases in
their files are not the ones our calibration chose, and the sim would no longer predict the device. The
schema's generated object API (`ai_edge_litert.schema_py_generated`: ModelT, SubGraphT, TensorT, ...) lets us
write exactly the QuantizedModel's numbers, op by op, with no converter in between: every QM op becomes one
TFLite builtin (plus a PAD where torch's symmetric padding is not TFLite's SAME; int8 hardswish / sigmoid /
silu / tanh / leaky_relu / gelu are a table lookup, CAST → ADD → GATHER, see `_table`), activations are fused, the
layout is NHWC from the start (no transposes), and the input/output tensors are int8.

The fp32 twin: the same writer with float32 tensors and the QM's dequantized constants (w = q·s, b = q_b·s_b),
so it is the same graph doing the same work in float — the fair latency baseline (its accuracy differs from
the float model only by weight rounding).

The writer validates the whole QM first and builds the file in memory; the file is written atomically
(temp file + rename), so a bad model or a killed process leaves no `.tflite` behind.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as tfl

from calibration.qmodel import CLAMP_OPS, TABLE_OPS, Op, QuantizedModel, Tensor
from calibration.reference import op_table
from calibration.sim import SELU_ALPHA, SELU_SCALE
from export.pipeline import Built, add_common_args, check_requantization, run_export, runtime_refusal
from export.verify import Runners
from ghnq.cli import UserError, drop_native_log_lines, run_cli
from ghnq.fileio import atomic_write_bytes

# Opcode versions as the official converter (TF 2.21 MLIR, full-integer int8) writes them for these ops —
# measured by converting a float graph with each op and reading the versions back. The runtime accepts any
# version, so writing the converter's keeps the files loadable by older runtimes that check them.
INT8_VERSIONS = {
    "CONV_2D": 3, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 4, "ADD": 2, "MUL": 2, "MEAN": 2,
    "AVERAGE_POOL_2D": 2, "MAX_POOL_2D": 2, "HARD_SWISH": 1, "PAD": 2, "PADV2": 2, "RESHAPE": 1, "CONCATENATION": 2,
    # the table ops' lookup (see _table): versions from TFLite's op_version.cc rules (CAST with an
    # int8 side: 3, GATHER of int8 params: 2), not from a conversion
    "CAST": 3, "GATHER": 2,
    "SUB": 2,  # op_version.cc: int8 without broadcast beyond 4-D
    # standalone clamps: op_version.cc gives RELU / RELU6 with int8 input version 2 (the converter fuses them)
    "RELU": 2, "RELU6": 2,
    # op_version.cc: int8 without align_corners / half_pixel_centers
    "RESIZE_NEAREST_NEIGHBOR": 2,
}
# int32 ops (the table index's ADD, the integer softmax): op_version.cc's version 1 for int32 operands, except
# GATHER (its int32-params rule is version 1 too) — no quantized operand, no new kernel features
INT32_VERSIONS = {"ADD": 1, "SUB": 1, "MUL": 1, "REDUCE_MAX": 1, "SUM": 1, "FLOOR_DIV": 1, "MINIMUM": 1, "GATHER": 1}
FP32_VERSION = 1
FUSED = {"none": tfl.ActivationFunctionType.NONE, "relu": tfl.ActivationFunctionType.RELU,
         "relu6": tfl.ActivationFunctionType.RELU6,
         # int8: the output tensor is (1/255, -128), whose int8 range is exactly [0, 1]; the saturating cast
         # is the upper clamp and RELU the lower one (TFLite has no fused 0..1 clamp). fp32: see _fp32_clamp.
         "relu_0_to_1": tfl.ActivationFunctionType.RELU}
TYPES = {"int8": tfl.TensorType.INT8, "int32": tfl.TensorType.INT32, "float32": tfl.TensorType.FLOAT32,
         "bool": tfl.TensorType.BOOL}
SIGNATURE = ("serving_default", "input", "logits")


# ----------------------------------------------------------------------------------------------------
# Flatbuffer assembly: tensors, buffers, opcodes, operators → bytes


class _AlignedBufferT(tfl.BufferT):
    """A buffer whose data starts on a 16-byte boundary, as the converter writes them: kernels read int32
    biases and int8 weights in place, some with aligned vector loads."""

    def Pack(self, builder: flatbuffers.Builder) -> int:  # noqa: N802 (the object API's name)
        data = None
        if self.data is not None:
            payload = np.ascontiguousarray(self.data).tobytes()
            builder.StartVector(1, len(payload), 16)
            builder.head -= len(payload)
            builder.Bytes[builder.head:builder.head + len(payload)] = payload
            data = builder.EndVector()
        tfl.BufferStart(builder)
        if data is not None:
            tfl.BufferAddData(builder, data)
        return tfl.BufferEnd(builder)


class GraphBuilder:
    """One subgraph under construction; `finish()` packs it into a `.tflite` byte string."""

    def __init__(self) -> None:
        self.tensors: list[tfl.TensorT] = []
        self.index: dict[str, int] = {}
        self.buffers: list[tfl.BufferT] = [tfl.BufferT()]  # buffer 0: the empty sentinel the runtime requires
        self.opcodes: dict[tuple[int, int], int] = {}
        self.operators: list[tfl.OperatorT] = []

    def tensor(self, name: str, shape: list[int], dtype: str, data: np.ndarray | None = None,
               scale: np.ndarray | None = None, zero_point: np.ndarray | None = None, axis: int = 0) -> int:
        if name in self.index:
            raise ValueError(f"tensor {name!r} defined twice")
        t = tfl.TensorT()
        t.name, t.shape, t.type, t.hasRank = name, np.array(shape, np.int32), TYPES[dtype], True
        if data is not None:
            if list(data.shape) != list(shape) or str(data.dtype) != dtype:
                raise ValueError(f"tensor {name!r}: data {data.dtype}{list(data.shape)} vs {dtype}{shape}")
            buf = _AlignedBufferT()
            buf.data = np.ascontiguousarray(data)
            t.buffer = len(self.buffers)
            self.buffers.append(buf)
        if scale is not None:
            q = tfl.QuantizationParametersT()
            q.scale = np.asarray(scale, np.float32)
            q.zeroPoint = np.asarray(zero_point, np.int64)
            q.quantizedDimension = axis
            t.quantization = q
        self.index[name] = len(self.tensors)
        self.tensors.append(t)
        return self.index[name]

    def op(self, code_name: str, inputs: list[str], outputs: list[str], options: object | None = None,
           version: int = 1) -> None:
        code = getattr(tfl.BuiltinOperator, code_name)
        if (code, version) not in self.opcodes:
            self.opcodes[(code, version)] = len(self.opcodes)
        o = tfl.OperatorT()
        o.opcodeIndex = self.opcodes[(code, version)]
        o.inputs = np.array([self.index[n] for n in inputs], np.int32)
        o.outputs = np.array([self.index[n] for n in outputs], np.int32)
        if options is not None:
            o.builtinOptionsType = getattr(tfl.BuiltinOptions, type(options).__name__[:-1])  # XxxOptionsT → Xxx
            o.builtinOptions = options
        self.operators.append(o)

    def finish(self, inputs: list[str], outputs: list[str], description: str) -> bytes:
        codes = []
        for code, version in self.opcodes:  # dict order = opcode index order
            oc = tfl.OperatorCodeT()
            # Both fields: readers before schema 3a use the deprecated int8 field, newer ones the int32 one.
            oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), version
            codes.append(oc)
        sg = tfl.SubGraphT()
        sg.tensors, sg.operators, sg.name = self.tensors, self.operators, "main"
        sg.inputs = np.array([self.index[n] for n in inputs], np.int32)
        sg.outputs = np.array([self.index[n] for n in outputs], np.int32)
        sig = tfl.SignatureDefT()
        sig.signatureKey, sig.subgraphIndex = SIGNATURE[0], 0
        sig.inputs = [_tensor_map(SIGNATURE[1] if len(inputs) == 1 else n, self.index[n]) for n in inputs]
        sig.outputs = [_tensor_map(SIGNATURE[2], self.index[outputs[0]])]
        model = tfl.ModelT()
        model.version, model.description = 3, description  # the runtime refuses any schema version but 3
        model.operatorCodes, model.subgraphs, model.buffers, model.signatureDefs = codes, [sg], self.buffers, [sig]
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def _tensor_map(name: str, index: int) -> tfl.TensorMapT:
    m = tfl.TensorMapT()
    m.name, m.tensorIndex = name, index
    return m


# ----------------------------------------------------------------------------------------------------
# QuantizedModel ops → TFLite builtins (one function per op kind; int8 and fp32 share them)


@dataclass
class _Ctx:
    qm: QuantizedModel
    g: GraphBuilder
    fp32: bool
    folded: dict[str, str] = field(default_factory=dict)  # mean output → the reshape output it writes instead

    def version(self, code_name: str) -> int:
        return FP32_VERSION if self.fp32 else INT8_VERSIONS[code_name]

    def activation(self, name: str, shape: list[int] | None = None, like: str | None = None) -> str:
        """Declare an activation tensor (QM tensor `name`, or a new one with `like`'s quantization)."""
        if name not in self.g.index:
            t = self.qm.tensors[like or name]
            shape = list(shape if shape is not None else self.qm.tensors[name].shape)
            if self.fp32:
                self.g.tensor(name, shape, "float32")
            else:
                self.g.tensor(name, shape, "int8", scale=t.scale, zero_point=t.zero_point)
        return name

    def const(self, name: str, data: np.ndarray, t: Tensor, axis: int) -> str:
        """A weight or bias: int8/int32 codes with the QM's scales, or (fp32) the dequantized values."""
        if self.fp32:
            scale = t.scale.astype(np.float32).reshape([-1 if i == axis else 1 for i in range(data.ndim)])
            self.g.tensor(name, list(data.shape), "float32", data=(data.astype(np.float32) * scale))
        else:
            self.g.tensor(name, list(data.shape), t.dtype, data=data, scale=t.scale,
                          zero_point=np.zeros(len(t.scale), np.int64), axis=axis)
        return name

    def int32_const(self, name: str, values: list[int] | np.ndarray) -> str:
        data = np.asarray(values, np.int32)
        self.g.tensor(name, list(data.shape), "int32", data=data)
        return name

    def float32_const(self, name: str, value: float) -> str:
        """A one-element float32 constant (an fp32 twin's operand, broadcast by the op)."""
        self.g.tensor(name, [1], "float32", data=np.array([value], np.float32))
        return name


def _where(op: Op) -> str:
    return f"{op.kind} ({op.source or '?'})"


def _padding_mode(op: Op, in_hw: list[int], out_hw: list[int], kernel: list[int], stride: list[int],
                  dilation: list[int]) -> int | None:
    """SAME or VALID when TFLite's padding rule gives exactly the QM's [top, bottom, left, right], else None.

    TFLite SAME pads total = max((out-1)·s + k_eff - in, 0) with top = total // 2 (the extra row at the
    bottom); torch pads symmetrically, so a stride-2 layer on an even size needs an explicit PAD instead.
    """
    pads = op.attrs.get("padding", [0, 0, 0, 0])
    if not any(pads):
        valid = all(o == (i - (k - 1) * d - 1) // s + 1
                    for i, o, k, s, d in zip(in_hw, out_hw, kernel, stride, dilation, strict=True))
        if valid:
            return tfl.Padding.VALID
    same = True
    for (i, o, k, s, d), before in zip(zip(in_hw, out_hw, kernel, stride, dilation, strict=True),
                                       (pads[0], pads[2]), strict=True):
        total = max((o - 1) * s + (k - 1) * d + 1 - i, 0)
        same &= o == math.ceil(i / s) and before == total // 2
    return tfl.Padding.SAME if same else None


def _explicit_pad(c: _Ctx, op: Op, x: str, lowest: bool = False) -> str:
    """A PAD op with the QM's padding (pads with the zero point = real 0), or with `lowest` a PADV2 padding with
    the lowest value (int8 code -128; the fp32 twin float32's lowest); the layer then runs VALID."""
    t, b, left, r = op.attrs["padding"]
    shape = list(c.qm.tensors[x].shape)
    padded = f"{op.outputs[0]}/pad"
    c.activation(padded, [shape[0], shape[1] + t + b, shape[2] + left + r, shape[3]], like=x)
    paddings = c.int32_const(f"{padded}/paddings", [[0, 0], [t, b], [left, r], [0, 0]])
    if not lowest:
        c.g.op("PAD", [x, paddings], [padded], tfl.PadOptionsT(), c.version("PAD"))
        return padded
    value = f"{padded}/value"  # a scalar with the input's quantization, as PADV2 requires
    if c.fp32:
        c.g.tensor(value, [], "float32", data=np.array(np.finfo(np.float32).min, np.float32))
    else:
        q = c.qm.tensors[x]
        c.g.tensor(value, [], "int8", data=np.array(-128, np.int8), scale=q.scale, zero_point=q.zero_point)
    c.g.op("PADV2", [x, paddings, value], [padded], tfl.PadV2OptionsT(), c.version("PADV2"))
    return padded


def _conv_input(c: _Ctx, op: Op, kernel: list[int]) -> tuple[str, int]:
    x, y = op.inputs[0], op.outputs[0]
    in_hw, out_hw = c.qm.tensors[x].shape[1:3], c.qm.tensors[y].shape[1:3]
    mode = _padding_mode(op, in_hw, out_hw, kernel, op.attrs["stride"], op.attrs.get("dilation", [1, 1]))
    if mode is None:
        return _explicit_pad(c, op, x), tfl.Padding.VALID
    return x, mode


def _conv2d(c: _Ctx, op: Op) -> None:
    x, w_name, b_name = op.inputs
    w, b = c.qm.tensors[w_name], c.qm.tensors[b_name]
    x, padding = _conv_input(c, op, list(w.data.shape[2:]))
    wq = c.const(w_name, w.data.transpose(0, 2, 3, 1), w, axis=0)  # torch OIHW → TFLite OHWI
    bq = c.const(b_name, b.data, b, axis=0)
    sh, sw = op.attrs["stride"]
    dh, dw = op.attrs.get("dilation", [1, 1])
    opts = tfl.Conv2DOptionsT(padding=padding, strideW=sw, strideH=sh, fusedActivationFunction=FUSED[op.attrs["fused"]],
                              dilationWFactor=dw, dilationHFactor=dh)
    _emit_fused(c, op, "CONV_2D", [x, wq, bq], opts)


def _depthwise_conv2d(c: _Ctx, op: Op) -> None:
    x, w_name, b_name = op.inputs
    w, b = c.qm.tensors[w_name], c.qm.tensors[b_name]
    x, padding = _conv_input(c, op, list(w.data.shape[2:]))
    # torch [C·m, 1, kh, kw] → TFLite [1, kh, kw, C·m], per-channel scales on dimension 3
    wq = c.const(w_name, w.data.transpose(1, 2, 3, 0), w, axis=3)
    bq = c.const(b_name, b.data, b, axis=0)
    sh, sw = op.attrs["stride"]
    dh, dw = op.attrs.get("dilation", [1, 1])
    opts = tfl.DepthwiseConv2DOptionsT(padding=padding, strideW=sw, strideH=sh,
                                       depthMultiplier=int(op.attrs.get("depth_multiplier", 1)),
                                       fusedActivationFunction=FUSED[op.attrs["fused"]], dilationWFactor=dw,
                                       dilationHFactor=dh)
    _emit_fused(c, op, "DEPTHWISE_CONV_2D", [x, wq, bq], opts)


def _fully_connected(c: _Ctx, op: Op) -> None:
    x, w_name, b_name = op.inputs
    w, b = c.qm.tensors[w_name], c.qm.tensors[b_name]
    wq = c.const(w_name, w.data, w, axis=0)  # [O, I] is TFLite's layout already
    bq = c.const(b_name, b.data, b, axis=0)
    opts = tfl.FullyConnectedOptionsT(fusedActivationFunction=FUSED[op.attrs["fused"]])
    _emit_fused(c, op, "FULLY_CONNECTED", [c.activation(x), wq, bq], opts)


def _emit_fused(c: _Ctx, op: Op, code: str, inputs: list[str], opts: object) -> None:
    """Emit a layer with a fused activation; fp32's relu_0_to_1 needs one RELU_0_TO_1 op after it."""
    y = op.outputs[0]
    if c.fp32 and op.attrs.get("fused") == "relu_0_to_1":
        opts.fusedActivationFunction = tfl.ActivationFunctionType.NONE
        pre = c.activation(f"{y}/pre_clamp", like=y, shape=c.qm.tensors[y].shape)
        c.g.op(code, inputs, [pre], opts, c.version(code))
        c.g.op("RELU_0_TO_1", [pre], [c.activation(y)], None, FP32_VERSION)
    else:
        c.g.op(code, inputs, [c.activation(y)], opts, c.version(code))


def _binary(c: _Ctx, op: Op, code: str, options: object) -> None:
    """ADD / SUB / MUL of two activations, with the op's fused activation (a sub's is always none)."""
    a, b = (c.activation(n) for n in op.inputs)
    options.fusedActivationFunction = FUSED[op.attrs.get("fused", "none")]
    c.g.op(code, [a, b], [c.activation(op.outputs[0])], options, c.version(code))


def _mean(c: _Ctx, op: Op) -> None:
    y, keep = op.outputs[0], bool(op.attrs["keepdims"])
    if y in c.folded:  # global pool + flatten: one MEAN without keepdims, as the converter writes it
        y, keep = c.folded[y], False
    axes = c.int32_const(f"{y}/axes", op.attrs.get("axes", [1, 2]))
    c.g.op("MEAN", [c.activation(op.inputs[0]), axes], [c.activation(y)], tfl.ReducerOptionsT(keepDims=keep),
           c.version("MEAN"))


def fold_mean_reshape(qm: QuantizedModel, ops: list[Op]) -> dict[str, str]:
    """mean(keepdims) → reshape to [1, C], when nothing else reads the mean: write one MEAN (keepdims false).

    Exact: a reshape moves no code and shares its input's (scale, zero point) (QM convention).
    Returns mean output → reshape output; the mean's own output tensor then does not exist in the file.
    """
    readers: dict[str, int] = {}
    for op in ops:
        for n in op.inputs:
            readers[n] = readers.get(n, 0) + 1
    folded = {}
    for op in ops:
        if op.kind != "reshape" or len(op.attrs["shape"]) != 2:
            continue
        src = qm.producer(op.inputs[0])
        t_in, t_out = qm.tensors[op.inputs[0]], qm.tensors[op.outputs[0]]
        if (src is not None and src in ops and src.kind == "mean" and src.attrs["keepdims"] and
                readers[op.inputs[0]] == 1 and op.inputs[0] != qm.output and
                t_in.scale.tobytes() == t_out.scale.tobytes() and np.array_equal(t_in.zero_point, t_out.zero_point)):
            folded[op.inputs[0]] = op.outputs[0]
    return folded


def _pool(c: _Ctx, op: Op, code: str) -> None:
    x = op.inputs[0]
    kh, kw = op.attrs["kernel"]
    mode = _padding_mode(op, c.qm.tensors[x].shape[1:3], c.qm.tensors[op.outputs[0]].shape[1:3], [kh, kw],
                         op.attrs["stride"], [1, 1])
    if mode is None:
        # The QM's pools leave padded positions out (TFLite's SAME does too, but pads only its own way). A max
        # pool takes an explicit pad and runs VALID: padding with the lowest value changes no max, as every
        # window holds at least one real position. After a ReLU that is the zero point (real 0 ≤ every input),
        # a plain PAD that XNNPACK delegates; otherwise PADV2 with code -128. An average has no such rewrite.
        if code != "MAX_POOL_2D":
            raise UserError(f"{_where(op)}: padding {op.attrs['padding']} is neither TFLite SAME nor VALID, and an "
                            "average pool cannot take an explicit pad exactly (padded positions would count)")
        producer = c.qm.producer(x)
        after_relu = producer is not None and producer.attrs.get("fused", "none") != "none"
        x, mode = _explicit_pad(c, op, x, lowest=not after_relu), tfl.Padding.VALID
    sh, sw = op.attrs["stride"]
    opts = tfl.Pool2DOptionsT(padding=mode, strideW=sw, strideH=sh, filterWidth=kw, filterHeight=kh)
    c.g.op(code, [c.activation(x)], [c.activation(op.outputs[0])], opts, c.version(code))


def _table(c: _Ctx, op: Op) -> None:
    """int8 table op (hardswish, sigmoid, silu, tanh, leaky_relu, gelu, elu): the integer reference's 256-entry table,
    looked up with integer-only builtins:
    CAST(int8 → int32) → ADD(+128, int32) → GATHER(params = the int8 table carrying the output's quantization).

    Not TFLite's own int8 kernels: HARD_SWISH (int16 fixed point) differs by up to a code per op from what
    ExecuTorch's XNNPACK delegate computes (the fp32 op between dequantize and quantize), LOGISTIC and TANH
    require fixed output scales, and SiLU has no builtin. A table is the one function both runtimes can
    evaluate identically, for any output (scale, zp) calibration chose. The three ops run on
    LiteRT's builtin kernels (the XNNPACK delegate takes none of them). fp32 twin: the float builtins."""
    x, y = op.inputs[0], op.outputs[0]
    if c.fp32:
        _fp32_table_op(c, op)
        return
    t_in, t_out = c.qm.tensors[x], c.qm.tensors[y]
    table = op_table(op, t_in.qparams, t_out.qparams)
    shape = list(t_in.shape)
    codes, index = f"{y}/codes", f"{y}/index"
    c.g.tensor(codes, shape, "int32")
    c.g.tensor(index, shape, "int32")
    c.g.tensor(f"{y}/table", [table.size], "int8", data=np.array(table, np.int8).ravel(), scale=t_out.scale,
               zero_point=t_out.zero_point)
    # index = code + 128; a per-channel table (prelu's, [C, 256] flattened) adds 256 · channel, broadcast over
    # the last (channel) axis
    offset = [128] if table.ndim == 1 else list(128 + 256 * np.arange(len(table)))
    c.g.op("CAST", [c.activation(x)], [codes], tfl.CastOptionsT(inDataType=tfl.TensorType.INT8,
                                                                 outDataType=tfl.TensorType.INT32), c.version("CAST"))
    c.g.op("ADD", [codes, c.int32_const(f"{y}/offset", offset)], [index], tfl.AddOptionsT(), INT32_VERSIONS["ADD"])
    c.g.op("GATHER", [f"{y}/table", index], [c.activation(y)], tfl.GatherOptionsT(axis=0, batchDims=0),
           c.version("GATHER"))


def _fp32_table_op(c: _Ctx, op: Op) -> None:
    """The fp32 twin's builtin for a table op; SiLU has none: x · LOGISTIC(x)."""
    x, y = c.activation(op.inputs[0]), c.activation(op.outputs[0])
    if op.kind == "silu":
        gate = c.activation(f"{op.outputs[0]}/sigmoid", list(c.qm.tensors[op.outputs[0]].shape), like=op.outputs[0])
        c.g.op("LOGISTIC", [x], [gate], None, FP32_VERSION)
        c.g.op("MUL", [x, gate], [y], tfl.MulOptionsT(), FP32_VERSION)
    elif op.kind == "leaky_relu":
        c.g.op("LEAKY_RELU", [x], [y], tfl.LeakyReluOptionsT(alpha=float(op.attrs["alpha"])), FP32_VERSION)
    elif op.kind == "gelu":
        c.g.op("GELU", [x], [y], tfl.GeluOptionsT(approximate=False), FP32_VERSION)
    elif op.kind in ("elu", "selu", "celu"):
        _fp32_elu(c, op, x, y)
    elif op.kind == "softsign":  # x / (1 + |x|)
        out, shape = op.outputs[0], list(c.qm.tensors[op.outputs[0]].shape)
        mag, den = (c.activation(f"{out}/{p}", shape, like=out) for p in ("abs", "den"))
        c.g.op("ABS", [x], [mag], None, FP32_VERSION)
        c.g.op("ADD", [mag, c.float32_const(f"{out}/one", 1.0)], [den], tfl.AddOptionsT(), FP32_VERSION)
        c.g.op("DIV", [x, den], [y], tfl.DivOptionsT(), FP32_VERSION)
    elif op.kind == "prelu":
        alpha = np.array(op.attrs["alpha"], np.float32)
        c.g.tensor(f"{op.outputs[0]}/alpha", [len(alpha)], "float32", data=alpha)
        c.g.op("PRELU", [x, f"{op.outputs[0]}/alpha"], [y], None, FP32_VERSION)
    elif op.kind == "hardtanh":  # MAXIMUM with min, then MINIMUM with max (an open side: no op)
        out, shape, src = op.outputs[0], list(c.qm.tensors[op.outputs[0]].shape), x
        steps = [(code, v) for code, v in (("MAXIMUM", op.attrs["min"]), ("MINIMUM", op.attrs["max"])) if v is not None]
        for i, (code, v) in enumerate(steps):
            dst = y if i == len(steps) - 1 else c.activation(f"{out}/{code.lower()}", shape, like=out)
            c.g.op(code, [src, c.float32_const(f"{out}/{code.lower()}_bound", v)], [dst], None, FP32_VERSION)
            src = dst
    elif op.kind == "softplus":
        _fp32_softplus(c, op, x, y, float(op.attrs["beta"]), float(op.attrs["threshold"]))
    elif op.kind == "mish":  # x · TANH(softplus(x)), torch's beta 1 and threshold 20
        soft, gate = (c.activation(f"{op.outputs[0]}/{p}", list(c.qm.tensors[op.outputs[0]].shape), like=op.outputs[0])
                      for p in ("softplus", "tanh"))
        _fp32_softplus(c, op, x, soft, 1.0, 20.0)
        c.g.op("TANH", [soft], [gate], None, FP32_VERSION)
        c.g.op("MUL", [x, gate], [y], tfl.MulOptionsT(), FP32_VERSION)
    else:
        code = {"hardswish": "HARD_SWISH", "sigmoid": "LOGISTIC", "tanh": "TANH"}[op.kind]
        c.g.op(code, [x], [y], None, FP32_VERSION)


def _fp32_elu(c: _Ctx, op: Op, x: str, y: str) -> None:
    """ELU / SELU / CELU in TFLite float builtins (LiteRT's kernels have no ELU builtin):
    scale · (RELU(x) + alpha · (EXP(MINIMUM(x, 0) / input_scale) − 1)), torch's constants for SELU, input_scale =
    alpha for CELU."""
    alpha = float(op.attrs.get("alpha", 1.0))
    scale, input_scale = {"elu": (1.0, 1.0), "selu": (SELU_SCALE, 1.0), "celu": (1.0, alpha)}[op.kind]
    if op.kind == "selu":
        alpha = SELU_ALPHA
    out, shape = op.outputs[0], list(c.qm.tensors[op.outputs[0]].shape)
    neg, shrunk, exp, less, scaled, pos, total = (c.activation(f"{out}/{p}", shape, like=out)
                                                  for p in ("neg", "shrunk", "exp", "expm1", "scaled", "relu", "sum"))
    for name, value in (("zero", 0.0), ("one", 1.0), ("alpha", alpha), ("inv_input_scale", 1.0 / input_scale),
                        ("scale", scale)):
        c.float32_const(f"{out}/{name}", value)
    c.g.op("MINIMUM", [x, f"{out}/zero"], [neg], None, FP32_VERSION)
    c.g.op("MUL", [neg, f"{out}/inv_input_scale"], [shrunk], tfl.MulOptionsT(), FP32_VERSION)
    c.g.op("EXP", [shrunk], [exp], None, FP32_VERSION)
    c.g.op("SUB", [exp, f"{out}/one"], [less], tfl.SubOptionsT(), FP32_VERSION)
    c.g.op("MUL", [less, f"{out}/alpha"], [scaled], tfl.MulOptionsT(), FP32_VERSION)
    c.g.op("RELU", [x], [pos], None, FP32_VERSION)
    c.g.op("ADD", [pos, scaled], [total], tfl.AddOptionsT(), FP32_VERSION)
    c.g.op("MUL", [total, f"{out}/scale"], [y], tfl.MulOptionsT(), FP32_VERSION)


def _fp32_softplus(c: _Ctx, op: Op, x: str, y: str, beta: float, threshold: float) -> None:
    """torch's softplus in TFLite float builtins (there is no SOFTPLUS): z = beta · x;
    SELECT_V2(z > threshold, x, LOG(EXP(MINIMUM(z, threshold)) + 1) / beta)."""
    out, shape = y, list(c.qm.tensors[op.outputs[0]].shape)
    z, clipped, exp, sum1, log, soft = (c.activation(f"{out}/{p}", shape, like=op.outputs[0])
                                         for p in ("z", "clipped", "exp", "plus1", "log", "soft"))
    above = f"{out}/above"
    c.g.tensor(above, shape, "bool")
    for name, value in (("beta", beta), ("threshold", threshold), ("one", 1.0), ("inv_beta", 1.0 / beta)):
        c.float32_const(f"{out}/{name}", value)
    c.g.op("MUL", [x, f"{out}/beta"], [z], tfl.MulOptionsT(), FP32_VERSION)
    c.g.op("MINIMUM", [z, f"{out}/threshold"], [clipped], None, FP32_VERSION)
    c.g.op("EXP", [clipped], [exp], None, FP32_VERSION)
    c.g.op("ADD", [exp, f"{out}/one"], [sum1], tfl.AddOptionsT(), FP32_VERSION)
    c.g.op("LOG", [sum1], [log], None, FP32_VERSION)
    c.g.op("MUL", [log, f"{out}/inv_beta"], [soft], tfl.MulOptionsT(), FP32_VERSION)
    c.g.op("GREATER", [z, f"{out}/threshold"], [above], None, FP32_VERSION)
    c.g.op("SELECT_V2", [above, x, soft], [y], None, FP32_VERSION)


def _clamp(c: _Ctx, op: Op) -> None:
    # int8: the output shares the input's (scale, zp) (the QM guarantees it), so TFLite's requantization is the
    # identity (multiplier 2^30, shift 1) and the kernel clamps codes to the activation range
    code = op.kind.upper()
    c.g.op(code, [c.activation(op.inputs[0])], [c.activation(op.outputs[0])], None, c.version(code))


def _resize_nearest(c: _Ctx, op: Op) -> None:
    # int8: the output shares the input's (scale, zp) (the QM guarantees it), so TFLite copies codes; with
    # align_corners and half_pixel_centers false, output row i reads floor(i · float32(in / out)), which
    # calibration checked is i // factor (reference.nearest_source_index)
    _, h, w, _ = c.qm.tensors[op.outputs[0]].shape
    size = c.int32_const(f"{op.outputs[0]}/size", [h, w])
    c.g.op("RESIZE_NEAREST_NEIGHBOR", [c.activation(op.inputs[0]), size], [c.activation(op.outputs[0])],
           tfl.ResizeNearestNeighborOptionsT(alignCorners=False, halfPixelCenters=False),
           c.version("RESIZE_NEAREST_NEIGHBOR"))


def _pad(c: _Ctx, op: Op) -> None:
    t, b, left, r = op.attrs["padding"]
    paddings = c.int32_const(f"{op.outputs[0]}/paddings", [[0, 0], [t, b], [left, r], [0, 0]])
    c.g.op("PAD", [c.activation(op.inputs[0]), paddings], [c.activation(op.outputs[0])], tfl.PadOptionsT(),
           c.version("PAD"))


def _reshape(c: _Ctx, op: Op) -> None:
    if op.inputs[0] in c.folded:
        return  # written by its MEAN
    shape = c.int32_const(f"{op.outputs[0]}/shape", op.attrs["shape"])
    c.g.op("RESHAPE", [c.activation(op.inputs[0]), shape], [c.activation(op.outputs[0])], None,
           c.version("RESHAPE"))


def _concat(c: _Ctx, op: Op) -> None:
    # int8: every input shares the output's (scale, zp) (the QM guarantees it), so TFLite copies codes
    c.g.op("CONCATENATION", [c.activation(n) for n in op.inputs], [c.activation(op.outputs[0])],
           tfl.ConcatenationOptionsT(axis=op.attrs["axis"]), c.version("CONCATENATION"))


def _softmax(c: _Ctx, op: Op) -> None:
    """calibration.reference.softmax in int32 builtins: CAST → REDUCE_MAX → SUB → ADD 255 → GATHER (the QM's exp
    table) → SUM → MUL 2^8 + FLOOR_DIV(sum, 2) → FLOOR_DIV by the sum → SUB 128 → MINIMUM 127 → CAST to int8. Not
    TFLite's SOFTMAX: its int8 kernels (reference and optimized) are not ExecuTorch's, which this matches."""
    x, y = op.inputs[0], op.outputs[0]
    if c.fp32:
        c.g.op("SOFTMAX", [c.activation(x)], [c.activation(y)], tfl.SoftmaxOptionsT(beta=1.0), FP32_VERSION)
        return
    shape = list(c.qm.tensors[x].shape)

    def t32(name: str, dims: list[int]) -> str:
        c.g.tensor(f"{y}/{name}", dims, "int32")
        return f"{y}/{name}"

    row = [shape[0], 1]
    codes, top, diff, index, exp, total, half, scaled, num, ratio, shifted, capped = (
        t32(n, d) for n, d in (("codes", shape), ("max", row), ("diff", shape), ("index", shape), ("exp", shape),
                               ("sum", row), ("half", row), ("scaled", shape), ("num", shape), ("ratio", shape),
                               ("shifted", shape), ("capped", shape)))
    axis = c.int32_const(f"{y}/axis", [1])
    table = c.int32_const(f"{y}/exp_table", op.attrs["exp_table"])
    v = INT32_VERSIONS
    c.g.op("CAST", [c.activation(x)], [codes], tfl.CastOptionsT(inDataType=tfl.TensorType.INT8,
                                                                 outDataType=tfl.TensorType.INT32), c.version("CAST"))
    c.g.op("REDUCE_MAX", [codes, axis], [top], tfl.ReducerOptionsT(keepDims=True), v["REDUCE_MAX"])
    c.g.op("SUB", [codes, top], [diff], tfl.SubOptionsT(), v["SUB"])
    c.g.op("ADD", [diff, c.int32_const(f"{y}/255", [255])], [index], tfl.AddOptionsT(), v["ADD"])
    c.g.op("GATHER", [table, index], [exp], tfl.GatherOptionsT(axis=0, batchDims=0), v["GATHER"])
    c.g.op("SUM", [exp, axis], [total], tfl.ReducerOptionsT(keepDims=True), v["SUM"])
    c.g.op("FLOOR_DIV", [total, c.int32_const(f"{y}/2", [2])], [half], None, v["FLOOR_DIV"])
    c.g.op("MUL", [exp, c.int32_const(f"{y}/256", [256])], [scaled], tfl.MulOptionsT(), v["MUL"])
    c.g.op("ADD", [scaled, half], [num], tfl.AddOptionsT(), v["ADD"])
    c.g.op("FLOOR_DIV", [num, total], [ratio], None, v["FLOOR_DIV"])
    c.g.op("SUB", [ratio, c.int32_const(f"{y}/128", [128])], [shifted], tfl.SubOptionsT(), v["SUB"])
    c.g.op("MINIMUM", [shifted, c.int32_const(f"{y}/127", [127])], [capped], None, v["MINIMUM"])
    c.g.op("CAST", [capped], [c.activation(y)], tfl.CastOptionsT(inDataType=tfl.TensorType.INT32,
                                                                  outDataType=tfl.TensorType.INT8), c.version("CAST"))


def _gather(c: _Ctx, op: Op) -> None:
    # a channel shuffle / chunk / slice: GATHER on the channel axis with constant int32 indices; the output
    # shares the input's (scale, zp) (the QM guarantees it), so TFLite copies codes
    indices = c.int32_const(f"{op.outputs[0]}/indices", op.attrs["indices"])
    c.g.op("GATHER", [c.activation(op.inputs[0]), indices], [c.activation(op.outputs[0])],
           tfl.GatherOptionsT(axis=op.attrs["axis"], batchDims=0), c.version("GATHER"))


EMITTERS = {
    "conv2d": _conv2d, "depthwise_conv2d": _depthwise_conv2d, "fully_connected": _fully_connected,
    "add": lambda c, op: _binary(c, op, "ADD", tfl.AddOptionsT()),
    "sub": lambda c, op: _binary(c, op, "SUB", tfl.SubOptionsT()),
    "mul": lambda c, op: _binary(c, op, "MUL", tfl.MulOptionsT()), "mean": _mean,
    "max_pool2d": lambda c, op: _pool(c, op, "MAX_POOL_2D"),
    "avg_pool2d": lambda c, op: _pool(c, op, "AVERAGE_POOL_2D"), **dict.fromkeys(TABLE_OPS, _table),
    **dict.fromkeys(CLAMP_OPS, _clamp), "resize_nearest": _resize_nearest, "pad": _pad,
    "reshape": _reshape, "concat": _concat, "gather": _gather, "softmax": _softmax,
}


def check_supported(qm: QuantizedModel) -> None:
    """Everything the int8 writer needs from a QM, checked before any byte is written (UserError)."""
    qm.validate()
    check_requantization(qm)
    for op in qm.ops:
        if op.kind not in EMITTERS:
            raise UserError(f"{_where(op)}: no TFLite mapping for op kind {op.kind!r}; supported: "
                            f"{', '.join(EMITTERS)}")
        for name in op.inputs + op.outputs:
            t = qm.tensors[name]
            if not t.is_const and (t.bits != 8 or len(t.scale) != 1):
                raise UserError(f"{_where(op)}: tensor {name!r} is {t.bits}-bit/{len(t.scale)}-scale; the int8 "
                                "TFLite writer needs 8-bit per-tensor activations (calibrate with --act-bits 8)")
            if t.is_const and (np.any(t.zero_point != 0) or t.axis not in (0, None)):
                raise UserError(f"{_where(op)}: constant {name!r} must be symmetric per-channel on axis 0")
        if op.kind in ("conv2d", "depthwise_conv2d") and len(qm.tensors[op.inputs[0]].shape) != 4:
            raise UserError(f"{_where(op)}: input must be NHWC 4-D")


def build_tflite(qm: QuantizedModel, fp32: bool = False, ops: list[Op] | None = None) -> bytes:
    """The whole `.tflite` as bytes: int8 with the QM's exact parameters, or the fp32 twin.

    `ops` (a sub-list of qm.ops) builds a graph of just those ops, whose inputs are every activation they
    read and do not produce (tests use it to run one op in isolation on the reference's input codes).
    """
    check_supported(qm)
    c = _Ctx(qm, GraphBuilder(), fp32)
    if ops is None:
        ops, inputs, outputs = qm.ops, [qm.input], [qm.output]
    else:
        made = {n for op in ops for n in op.outputs}
        inputs = list(dict.fromkeys(n for op in ops for n in op.inputs
                                    if n not in made and not qm.tensors[n].is_const))
        outputs = [ops[-1].outputs[0]]
    for name in inputs:
        c.activation(name)
    c.folded = fold_mean_reshape(qm, ops)
    for op in ops:
        EMITTERS[op.kind](c, op)
    name = qm.meta.get("name", "model")
    kind = "fp32 twin (dequantized constants)" if fp32 else "integer-only int8"
    return c.g.finish(inputs, outputs, f"ghnq export.tflite: {name}, {kind}")


def write_tflite(qm: QuantizedModel, path: str | Path, fp32: bool = False) -> Path:
    """Build in memory (all checks first), then write atomically."""
    data = build_tflite(qm, fp32)
    return atomic_write_bytes(path, data)


# ----------------------------------------------------------------------------------------------------
# Running a .tflite in LiteRT

KERNELS = ("xnnpack", "builtin", "ref")


class LiteRTRunner:
    """A `.tflite` in the LiteRT interpreter, fed one image at a time (the graph's batch is 1).

    kernels: "xnnpack" = the default (XNNPACK delegate, what devices run), "builtin" = the optimized kernels
    without the delegate, "ref" = the reference kernels (`BUILTIN_REF`, the arithmetic the integer reference
    reproduces code for code). `preserve_all` keeps every intermediate tensor readable (per-layer checks;
    a delegate hides its intermediates, so use it with "builtin" or "ref").
    """

    def __init__(self, model: bytes | str | Path, kernels: str = "xnnpack", threads: int = 1,
                 preserve_all: bool = False) -> None:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        if kernels not in KERNELS:
            raise UserError(f"kernels: got {kernels!r}; allowed: {', '.join(KERNELS)}")
        resolver = {"xnnpack": OpResolverType.AUTO, "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                    "ref": OpResolverType.BUILTIN_REF}[kernels]
        content = model if isinstance(model, bytes) else Path(model).read_bytes()
        self.interp = Interpreter(model_content=content, num_threads=threads,
                                  experimental_op_resolver_type=resolver,
                                  experimental_preserve_all_tensors=preserve_all)
        with drop_native_log_lines(r"INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.$"):
            self.interp.allocate_tensors()  # LiteRT prints that line on a process's first XNNPACK allocation
        self.input = self.interp.get_input_details()[0]
        self.output = self.interp.get_output_details()[0]
        self.name = f"LiteRT {_litert_version()} ({kernels}, {threads} thread{'s' * (threads > 1)})"
        # the int8 arithmetic this run implements (export.verify holds it to the sim with the same rounding)
        self.arithmetic = "xnnpack" if kernels == "xnnpack" else "tflite"

    def invoke(self, x: np.ndarray) -> None:
        self.interp.set_tensor(self.input["index"], x[None])
        self.interp.invoke()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Inputs [N, ...] (one image per row) → outputs [N, ...]."""
        out = np.empty((len(x), *self.output["shape"][1:]), self.output["dtype"])
        for i in range(len(x)):
            self.invoke(x[i])
            out[i] = self.interp.get_tensor(self.output["index"])[0]
        return out

    def run_named(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Outputs [N, ...] of a graph whose every input is fed by tensor name from `feeds` ({name: [N, ...]});
        for graphs of one op with several inputs (add, mul), run on another run's captured tensors."""
        details = self.interp.get_input_details()
        n = len(feeds[details[0]["name"]])
        out = np.empty((n, *self.output["shape"][1:]), self.output["dtype"])
        for i in range(n):
            for d in details:
                self.interp.set_tensor(d["index"], feeds[d["name"]][i:i + 1].reshape(d["shape"]))
            self.interp.invoke()
            out[i] = self.interp.get_tensor(self.output["index"])[0]
        return out

    def tensors(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every named tensor of the graph (activations only) for inputs [N, ...], stacked over N."""
        details = [d for d in self.interp.get_tensor_details() if d["name"] and len(d["shape"]) and
                   d["shape"][0] == 1 and d["dtype"] in (np.int8, np.float32)]
        acc: dict[str, list[np.ndarray]] = {d["name"]: [] for d in details}
        for i in range(len(x)):
            self.invoke(x[i])
            for d in details:
                acc[d["name"]].append(self.interp.get_tensor(d["index"])[0].copy())
        return {n: np.stack(v) for n, v in acc.items()}


def _litert_version() -> str:
    from importlib.metadata import version

    return version("ai-edge-litert")


# ----------------------------------------------------------------------------------------------------
# The command


class _Fp32Runner:
    """The fp32 twin fed the real value of the int8 input codes ((q - zp) · s = pixel / 255)."""

    def __init__(self, model: bytes | Path, qm: QuantizedModel, threads: int) -> None:
        self.inner = LiteRTRunner(model, "xnnpack", threads)
        t = qm.tensors[qm.input]
        self.scale, self.zp = t.qparams
        self.name = "fp32 twin, " + self.inner.name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.inner(((x.astype(np.float32) - self.zp) * np.float32(self.scale)).astype(np.float32))


def build(qm: QuantizedModel, out_dir: Path, name: str, args: argparse.Namespace) -> Built:
    """Writer for the pipeline: both files built (and so checked) in memory and opened in LiteRT, then written
    atomically — a file the runtime refuses is never written."""
    int8, fp32 = build_tflite(qm), build_tflite(qm, fp32=True)
    threads = args.threads
    with runtime_refusal("LiteRT"):
        runners = Runners(runner=LiteRTRunner(int8, "xnnpack", threads),
                          exact_runners=[LiteRTRunner(int8, "ref")],
                          layer_runners=[LiteRTRunner(int8, "ref", preserve_all=True),
                                         LiteRTRunner(int8, "builtin", preserve_all=True)] if args.per_layer else [],
                          float_runners=[_Fp32Runner(fp32, qm, threads)])
    p8 = atomic_write_bytes(out_dir / f"{name}_int8.tflite", int8)
    p32 = atomic_write_bytes(out_dir / f"{name}_fp32.tflite", fp32)
    info = {"builder": "schema object API (ai_edge_litert.schema_py_generated)", "litert": _litert_version(),
            "int8_ops": op_histogram(int8), "fp32_ops": op_histogram(fp32)}
    return Built(artifact=p8, runners=runners, artifacts={"int8": p8, "fp32": p32}, info=info)


def op_histogram(data: bytes) -> dict[str, int]:
    """Builtin op name → count in a .tflite (read back from the flatbuffer)."""
    model = tfl.ModelT.InitFromPackedBuf(data, 0)
    names = {v: k for k, v in vars(tfl.BuiltinOperator).items() if not k.startswith("_")}
    counts: dict[str, int] = {}
    for op in model.subgraphs[0].operators:
        n = names[model.operatorCodes[op.opcodeIndex].builtinCode]
        counts[n] = counts.get(n, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.tflite", description=__doc__.split("\n\n")[0] + "\n\n"
                                "Writes OUT/<name>_int8.tflite, <name>_fp32.tflite, <name>.qm, report.json, "
                                "report.md, plots and verify/ (the device bundle's inputs and expected outputs).",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    args = p.parse_args(argv)
    return run_export(args, "tflite", build)


if __name__ == "__main__":
    run_cli(main)
