"""The QuantizedModel: the one object that carries every quantization parameter of a network.

Calibration (`calibration.convert`) decides every scale and zero point once and writes them here; the
fake-quant simulation (`calibration.sim`), the integer reference (`calibration.reference`) and every
exporter (`export/`) read them from here and never choose numbers of their own.

Conventions (the contract exporters code against)
--------------------------------------------------
Graph
  `qm.ops` is the integer graph: a topologically ordered list of `Op`; each op maps 1:1 to one integer
  kernel (a TFLite builtin / an XNNPACK op). Exporters translate op by op; the sim and the integer
  reference execute the same list. `qm.input` / `qm.output` name the graph's input and output tensors.

Tensors (`qm.tensors`, name → `Tensor`)
  Every tensor is quantized: `scale` (float32 array), `zero_point` (int64 array), `axis` (quantized
  dimension for per-channel tensors, else None), `dtype` ("int8" or "int32"), `bits`.
  * Activations (`data is None`): per-tensor asymmetric, one float32 scale and one zero point in
    [-128, 127]; `bits` 8 (4 exists in the simulation only; exporters and the reference refuse it).
    Shapes are logical NHWC `[1, H, W, C]` for 4-D and `[1, C]` for 2-D (the integer graph's layout;
    the batch dimension is stored as 1, runtimes may batch). `rmin`/`rmax` record the float range the
    observer chose (provenance only; scale/zero_point are the truth).
  * Weights (`data` int8): per-output-channel symmetric, zero point 0, values in
    [-(2^(b-1)-1), 2^(b-1)-1] for weight bits b in {8, 6, 4, 2}, `axis` 0. Stored in TORCH layout:
    conv2d [O, I, kh, kw]; depthwise_conv2d [C*m, 1, kh, kw]; fully_connected [O, I]. The TFLite writer
    transposes (conv → OHWI, depthwise → [1, kh, kw, C*m] quantized on dim 3).
  * Biases (`data` int32, shape [O], `axis` 0, zero point 0): scale[c] = float32(s_in) * float32(s_w[c])
    multiplied in float32 (as the TFLite converter does); writers copy `scale` bit for bit.
  * Constants of elementwise ops: none are produced today (hardsigmoid is folded, see below).

Ops (`Op.kind`, inputs, attrs); `attrs["fused"]` in {"none", "relu", "relu6", "relu_0_to_1"}
  conv2d            [x, w, b]  stride [sh, sw], padding [top, bottom, left, right], dilation [dh, dw], fused;
                               grouped when w has fewer input channels than x (TFLite's rule): groups =
                               C_in / w.shape[1], output channel o reads the input channels of group o // (O / groups)
  depthwise_conv2d  [x, w, b]  as conv2d, plus depth_multiplier (output channel c reads input c // m)
  fully_connected   [x, w, b]  x is [1, I]; fused
  add               [a, b]     same shapes; fused
  sub               [a, b]     a − b, same shapes; fused none (XNNPACK fuses no activation into a subtract)
  mul               [a, b]     b may broadcast ([1, 1, 1, C] against [1, H, W, C]: the SE product); fused none
  mean              [x]        axes [1, 2] of NHWC, keepdims true → [1, 1, 1, C], false → [1, C]
  max_pool2d        [x]        kernel [kh, kw], stride, padding; out-of-range positions are excluded (torch and
                               TFLite SAME semantics); output shares the input's (scale, zp)
  avg_pool2d        [x]        kernel, stride, padding; divides by the number of in-range positions (TFLite);
                               output shares the input's (scale, zp)
  hardswish, sigmoid, silu, tanh, leaky_relu, gelu, elu, mish, softplus, prelu, hardtanh, selu, celu, softsign
  (TABLE_OPS; gelu: the erf form)
                    [x]        elementwise, own output (scale, zp); leaky_relu has `alpha` (the negative slope),
                               elu its `alpha` (x < 0: alpha · (exp(x) − 1)), softplus `beta` and `threshold`
                               (log(1 + exp(beta · x)) / beta, and x itself where beta · x > threshold: torch's);
                               prelu is leaky_relu with one `alpha` per channel (a list, one table per channel);
                               hardtanh clamps to [`min`, `max`] (either may be None: open), with its own output
                               (scale, zp), unlike the relu / relu6 clamps below; celu has `alpha`; selu and softsign
                               are torch's.
                               Each is one int8 → int8 function: a 256-entry table of output codes
                               (calibration.reference.table_for), which the TFLite writer writes as a GATHER
                               and ExecuTorch's XNNPACK delegate computes in float32 code for code
  relu, relu6       [x]        a standalone clamp at real 0 (and 6): where no layer before it can take it as a fused
                               activation (DPN's relu of a concat whose parts other ops also read). The output
                               shares the input's (scale, zp), so the kernel is exactly a clamp of the codes to the
                               fused range below (TFLite RELU / RELU6 with equal scales; XNNPACK's int8 clamp)
  resize_nearest    [x]        factor [fh, fw]: nearest upsampling by whole factors, output pixel (i, j) is input
                               pixel (i // fh, j // fw); output shares the input's (scale, zp) (a copy of codes)
  pad               [x]        padding [top, bottom, left, right], pads with the zero point (real 0);
                               output shares the input's (scale, zp)
  reshape           [x]        shape (the output shape); output shares the input's (scale, zp)
  gather            [x]        axis 3 (channels), indices: output channel j is input channel indices[j] (a
                               channel shuffle, chunk or slice); output shares the input's (scale, zp)
  softmax           [x]        x is [1, C]: softmax over the C features, in integers only (calibration.reference.
                               softmax); exp_table (256 int32: round(2^k · exp(s_in · (i − 255))), k chosen so that
                               C · 2^k < 2^31); the output is fixed at scale 1/2^bits, zero point −2^(bits−1)
  Padding is explicit: torch's symmetric padding differs from TFLite SAME for stride 2 with even sizes,
  so the writer decides SAME / VALID / a PAD op from these numbers. Conv padding means real 0 (the zero
  point); max_pool2d padding means "not a candidate" (a PAD+VALID rewrite is exact only when the input is
  ≥ real 0, e.g. after ReLU as in ResNet's stem).

Fused activations
  relu / relu6: the TFLite clamp of the output codes, [max(-128, zp + round(0/s)), min(127, zp + round(6/s))].
  relu_0_to_1: only on the conv/fc that ends in a folded hardsigmoid. hardsigmoid(z) = relu6(z + 3) / 6 is
  folded into that layer's float weights (w/6, (b + 3)/6) before quantization, and its output tensor is
  fixed at scale 1/255, zero point -128, whose int8 range is exactly [0, 1]: the saturating cast alone
  implements the clamp. TFLite writers write fused RELU (TFLite has no HARD_SIGMOID builtin; this needs no
  extra op). The SE block is then: mean → conv(relu) → conv(relu_0_to_1) → mul.

Input and output
  Input tensor: int8 `q = pixel - 128` for uint8 pixels, scale 1/255, zero point 0 (it represents
  (pixel - 128) / 255), NHWC [1, H, W, 3]. The dataset normalization (ghnq.data.MEAN/STD) is folded into the
  first conv's float weights and bias before weight quantization: exact in the interior. At zero-padded
  borders torch pads the *normalized* input with 0 (pixel = the dataset mean), while the integer conv pads
  with the input zero point; zero point 0 makes that pixel 128, within 0.04 / 0.08 / 0.21 std of the mean
  per channel (zero point -128, i.e. pixel 0, would be 2 std away and cost ~1 pp of top-1).
  Output: the final fully_connected's int8 output tensor (logit codes).

Fixed by calibration so that every runtime agrees (TFLite int8 constraints)
  max/avg pool, relu, relu6, resize_nearest, pad, reshape, gather share their input's (scale, zp); concat's inputs
  and output all share one (scale, zp) (TFLite's int8 CONCATENATION and XNNPACK require it: a copy, no requantization);
  the relu_0_to_1 output is (1/255, -128);
  mean, the table ops, mul, add, sub, conv, fc outputs have their own observed (scale, zp).

Provenance (`qm.meta`)
  spec (the validated spec dict), name, weights (where the float weights came from), method (activation
  observer), weight_bits, act_bits, calibration_images (count), calibration_source, bn_recalibrated,
  float_top1 / notes when known. Exporters copy it into their artifact metadata.

Files
  `save(qm, path)` writes one `.qm` file atomically: a zip (fixed timestamps, so equal models give equal
  bytes) holding `graph.json` (ops, tensor metadata, provenance `meta`), one `.npy` per constant and
  `sha256` = sha256 over graph.json and every array (name, dtype, shape, bytes). `load(path)` recomputes
  it and refuses an altered or corrupted file with a `UserError`. save → load → save is bit-identical.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ghnq.cli import UserError
from ghnq.fileio import atomic_write

FORMAT = "ghnq-qm"
VERSION = 1
WEIGHTED_OPS = ("conv2d", "depthwise_conv2d", "fully_connected")  # inputs: (x, int8 weight[, int32 bias])
# Elementwise int8 → int8 functions every runtime evaluates as the same 256-entry table (see reference.table_for).
TABLE_OPS = ("hardswish", "sigmoid", "silu", "tanh", "leaky_relu", "gelu", "elu", "mish", "softplus", "prelu",
             "hardtanh", "selu", "celu", "softsign")
CLAMP_OPS = ("relu", "relu6")  # standalone activations: a clamp of the codes, output shares the input's (scale, zp)
OP_KINDS = (*WEIGHTED_OPS, "add", "sub", "mul", "mean", "max_pool2d", "avg_pool2d", *TABLE_OPS, *CLAMP_OPS,
            "resize_nearest", "pad", "reshape", "concat", "gather", "softmax")
FUSED = ("none", "relu", "relu6", "relu_0_to_1")


def softmax_qparams(bits: int) -> tuple[float, int]:
    """The integer softmax's fixed output (scale, zero point): 1/2^bits, with probability 0 at the lowest code."""
    return 1.0 / (1 << bits), -(1 << (bits - 1))


WEIGHT_BITS = (8, 6, 4, 2)
INPUT_SCALE = float(np.float32(1.0 / 255.0))
INPUT_ZERO_POINT = 0  # real value (pixel - 128) / 255: the padding value (real 0) is pixel 128, near the mean
UNIT_SCALE, UNIT_ZERO_POINT = INPUT_SCALE, -128  # the relu_0_to_1 output: int8 range exactly [0, 1]
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


@dataclass
class Tensor:
    """One quantized tensor: an activation (data None) or a constant (int8 weights, int32 bias)."""

    name: str
    shape: list[int]
    dtype: str  # "int8" | "int32"
    scale: np.ndarray  # float32 [1] per-tensor, or [C] per-channel along `axis`
    zero_point: np.ndarray  # int64, same length as scale
    axis: int | None = None
    bits: int = 8
    data: np.ndarray | None = None
    rmin: float | None = None  # observed float range (activations; provenance only)
    rmax: float | None = None

    @property
    def qparams(self) -> tuple[float, int]:
        """(scale, zero point) of a per-tensor quantized tensor: real = scale * (code - zero point)."""
        return float(self.scale[0]), int(self.zero_point[0])

    @property
    def is_const(self) -> bool:
        return self.data is not None

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) + (1 if self.is_const and self.dtype == "int8" else 0)

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1


@dataclass
class Op:
    """One integer kernel: kind, input/output tensor names, attributes, and the torch module it came from."""

    kind: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # torch module path / fx node, for error messages and per-layer reports


@dataclass
class QuantizedModel:
    ops: list[Op]
    tensors: dict[str, Tensor]
    input: str
    output: str
    meta: dict[str, Any] = field(default_factory=dict)

    def weight_keys(self) -> list[str]:
        """Names of the int8 weight tensors, in op order (the keys simulate()/evolve override)."""
        return [op.inputs[1] for op in self.ops if op.kind in WEIGHTED_OPS]

    def output_qparams(self) -> tuple[float, int]:
        """(scale, zero point) of the output tensor: logit = scale * (code - zero point)."""
        return self.tensors[self.output].qparams

    def producer(self, name: str) -> Op | None:
        return next((op for op in self.ops if name in op.outputs), None)

    def validate(self) -> None:
        """Check the invariants this module documents; raise UserError naming the first broken one."""
        defined = {self.input} | {n for n, t in self.tensors.items() if t.is_const}
        for i, op in enumerate(self.ops):
            where = f"op {i} ({op.kind} from {op.source or '?'})"
            if op.kind not in OP_KINDS:
                raise UserError(f"{where}: unknown op kind; allowed: {', '.join(OP_KINDS)}")
            for name in op.inputs:
                if name not in self.tensors:
                    raise UserError(f"{where}: input tensor {name!r} missing from the tensor table")
                if name not in defined:
                    raise UserError(f"{where}: input {name!r} is used before any op produces it")
            if op.attrs.get("fused", "none") not in FUSED:
                raise UserError(f"{where}: fused={op.attrs['fused']!r}; allowed: {', '.join(FUSED)}")
            if op.kind in WEIGHTED_OPS and len(op.inputs) > 2:
                # TFLite's kernels and XNNPACK both take the int32 bias at scale s_in · s_w[c]; TFLite checks it to
                # a relative 1e-6, XNNPACK silently re-derives it
                x, w, b = (self.tensors[n] for n in op.inputs[:3])
                want = np.float32(x.scale[0]) * w.scale.astype(np.float32)
                if b.scale.shape != want.shape or not np.allclose(b.scale, want, rtol=1e-6, atol=0):
                    raise UserError(f"{where}: bias {op.inputs[2]!r} has scale {b.scale[:3]}, but the int8 runtimes "
                                    f"need input scale × weight scale = {want[:3]}")
            if op.kind == "conv2d" and len(op.inputs) > 1:
                c_in, (c_out, c_per) = self.tensors[op.inputs[0]].shape[-1], self.tensors[op.inputs[1]].data.shape[:2]
                if c_in % c_per or c_out % (c_in // c_per):
                    raise UserError(f"{where}: weight {op.inputs[1]!r} has {c_per} input channels for a {c_in}-channel "
                                    f"input and {c_out} outputs; groups (= {c_in} / {c_per}) must divide both")
            if op.kind in ("leaky_relu", "elu", "celu"):
                alpha = op.attrs.get("alpha")
                if not isinstance(alpha, int | float) or not np.isfinite(alpha):
                    what = "negative slope" if op.kind == "leaky_relu" else "alpha (the negative saturation)"
                    raise UserError(f"{where}: attrs.alpha={alpha!r}; {op.kind} needs a finite {what}")
                if op.kind == "celu" and alpha == 0:
                    raise UserError(f"{where}: attrs.alpha=0; celu divides by its alpha")
            if op.kind == "prelu":
                alpha, c = op.attrs.get("alpha"), self.tensors[op.inputs[0]].shape[-1]
                if not isinstance(alpha, list) or len(alpha) != c or not all(
                        isinstance(v, int | float) and np.isfinite(v) for v in alpha):
                    raise UserError(f"{where}: attrs.alpha; prelu needs a list of {c} finite negative slopes, one per "
                                    "input channel")
            if op.kind == "hardtanh":
                lo, hi = op.attrs.get("min"), op.attrs.get("max")
                if not all(v is None or (isinstance(v, int | float) and np.isfinite(v)) for v in (lo, hi)) or (
                        lo is None and hi is None) or (lo is not None and hi is not None and lo >= hi):
                    raise UserError(f"{where}: attrs min={lo!r}, max={hi!r}; hardtanh needs finite bounds (one may be "
                                    "None), min < max")
            if op.kind == "softmax":
                shape, table = self.tensors[op.inputs[0]].shape, op.attrs.get("exp_table")
                if len(shape) != 2 or not isinstance(table, list) or len(table) != 256 or not all(
                        isinstance(v, int) and 0 <= v <= table[-1] for v in table) or table[-1] * shape[-1] >= 2**31:
                    raise UserError(f"{where}: softmax needs a [1, C] input and attrs.exp_table, 256 non-negative ints "
                                    "whose largest (the last) times C is below 2^31")
                out = self.tensors[op.outputs[0]]
                if out.qparams != softmax_qparams(out.bits):
                    raise UserError(f"{where}: softmax output {op.outputs[0]!r} has (scale, zp) {out.qparams}; the "
                                    f"integer softmax writes codes at {softmax_qparams(out.bits)}")
            if op.kind == "softplus":
                beta, threshold = op.attrs.get("beta"), op.attrs.get("threshold")
                if not all(isinstance(v, int | float) and np.isfinite(v) for v in (beta, threshold)) or beta <= 0:
                    raise UserError(f"{where}: attrs beta={beta!r}, threshold={threshold!r}; softplus needs a finite "
                                    "beta > 0 and a finite threshold")
            if op.kind == "gather":
                c_in, idx = self.tensors[op.inputs[0]].shape[-1], op.attrs.get("indices")
                if op.attrs.get("axis") != 3 or not isinstance(idx, list) or not idx or not all(
                        isinstance(j, int) and 0 <= j < c_in for j in idx):
                    raise UserError(f"{where}: gather needs axis 3 and indices, a list of channels in [0, {c_in})")
                if list(self.tensors[op.outputs[0]].shape) != [*self.tensors[op.inputs[0]].shape[:3], len(idx)]:
                    raise UserError(f"{where}: output shape {self.tensors[op.outputs[0]].shape}; gather of "
                                    f"{len(idx)} channels needs {[*self.tensors[op.inputs[0]].shape[:3], len(idx)]}")
            if op.kind == "resize_nearest":
                f, shape = op.attrs.get("factor"), self.tensors[op.inputs[0]].shape
                if not (isinstance(f, list) and len(f) == 2 and all(isinstance(v, int) and v >= 1 for v in f)) or \
                        list(self.tensors[op.outputs[0]].shape) != [1, shape[1] * f[0], shape[2] * f[1], shape[3]]:
                    raise UserError(f"{where}: factor={f!r}; resize_nearest needs [fh, fw], whole numbers ≥ 1, and "
                                    f"an output of the input's size times them")
            if op.kind in ("gather", "concat", "resize_nearest", *CLAMP_OPS):
                q = {(tuple(self.tensors[n].scale), tuple(self.tensors[n].zero_point)) for n in op.inputs + op.outputs}
                if len(q) != 1:
                    raise UserError(f"{where}: {op.kind} inputs and output must share one (scale, zero point); the "
                                    "int8 runtimes copy (or clamp) codes without requantizing")
            defined.update(op.outputs)
        for name, t in self.tensors.items():
            if len(t.scale) != len(t.zero_point) or not np.all(np.isfinite(t.scale)) or np.any(t.scale <= 0):
                raise UserError(f"tensor {name!r}: bad quantization (scale {t.scale[:4]}, zp {t.zero_point[:4]})")
            if t.data is not None and str(t.data.dtype) != t.dtype:
                raise UserError(f"tensor {name!r}: data dtype {t.data.dtype} but declared {t.dtype}")
        if self.output not in defined:
            raise UserError(f"output tensor {self.output!r} is never produced")


def input_codes(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC pixels → the QM's int8 input codes (pixel - 128)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise UserError(f"images must be uint8 NHWC, got {images.dtype}")
    return (images.astype(np.int16) - 128).astype(np.int8)


# ----------------------------------------------------------------------------------------------------
# Save / load


def _graph_json(qm: QuantizedModel) -> bytes:
    tensors = {}
    for name, t in qm.tensors.items():
        tensors[name] = {"shape": list(t.shape), "dtype": t.dtype, "bits": t.bits, "axis": t.axis,
                         "scale": [float(s) for s in np.asarray(t.scale, np.float32)],
                         "zero_point": [int(z) for z in t.zero_point], "const": t.is_const,
                         "rmin": t.rmin, "rmax": t.rmax}
    graph = {"format": FORMAT, "version": VERSION, "input": qm.input, "output": qm.output, "meta": qm.meta,
             "ops": [{"kind": op.kind, "inputs": op.inputs, "outputs": op.outputs, "attrs": op.attrs,
                      "source": op.source} for op in qm.ops],
             "tensors": tensors}
    return json.dumps(graph, indent=1, sort_keys=True, allow_nan=False).encode()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _digest(graph: bytes, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    h.update(graph)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"\n{name}|{a.dtype.str}|{list(a.shape)}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def to_bytes(qm: QuantizedModel) -> bytes:
    """The `.qm` file's bytes (deterministic: equal models give equal bytes)."""
    qm.validate()
    graph = _graph_json(qm)
    arrays = {name: t.data for name, t in qm.tensors.items() if t.data is not None}
    entries = [("graph.json", graph)] + [(f"arrays/{n}.npy", _npy(arrays[n])) for n in sorted(arrays)]
    entries.append(("sha256", _digest(graph, arrays).encode()))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    return buf.getvalue()


def save(qm: QuantizedModel, path: str | os.PathLike) -> Path:
    """Write `qm` to `path` atomically (nothing is left behind if this fails)."""
    data = to_bytes(qm)
    return atomic_write(path, lambda f: f.write(data))


def load(path: str | os.PathLike) -> QuantizedModel:
    """Read a `.qm` file, verifying its sha256; UserError for anything missing, altered or corrupted."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such .qm file")
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            if "graph.json" not in names or "sha256" not in names:
                raise UserError(f"{path}: not a .qm file (graph.json or sha256 entry missing)")
            graph = z.read("graph.json")
            stored = z.read("sha256").decode("ascii", "replace").strip()
            arrays = {n[len("arrays/"):-len(".npy")]: np.lib.format.read_array(io.BytesIO(z.read(n)),
                                                                              allow_pickle=False)
                      for n in names if n.startswith("arrays/") and n.endswith(".npy")}
    except UserError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, ValueError, EOFError, KeyError) as err:
        raise UserError(f"{path}: corrupted .qm file, cannot be read ({type(err).__name__}: {err})") from None
    actual = _digest(graph, arrays)
    if actual != stored:
        raise UserError(f"{path}: sha256 mismatch, the file was altered or corrupted (stored {stored[:16]}..., "
                        f"content {actual[:16]}...); recreate it with `python -m calibration`")
    g = json.loads(graph)
    if g.get("format") != FORMAT or g.get("version") != VERSION:
        raise UserError(f"{path}: format {g.get('format')!r} version {g.get('version')!r}; this build reads "
                        f"{FORMAT!r} version {VERSION}")
    tensors = {}
    for name, t in g["tensors"].items():
        data = arrays.get(name) if t["const"] else None
        if t["const"] and data is None:
            raise UserError(f"{path}: constant tensor {name!r} has no array")
        tensors[name] = Tensor(name=name, shape=list(t["shape"]), dtype=t["dtype"],
                               scale=np.array(t["scale"], np.float32), zero_point=np.array(t["zero_point"], np.int64),
                               axis=t["axis"], bits=t["bits"], data=data, rmin=t["rmin"], rmax=t["rmax"])
    ops = [Op(kind=o["kind"], inputs=list(o["inputs"]), outputs=list(o["outputs"]), attrs=dict(o["attrs"]),
              source=o["source"]) for o in g["ops"]]
    qm = QuantizedModel(ops=ops, tensors=tensors, input=g["input"], output=g["output"], meta=g["meta"])
    qm.validate()
    return qm
