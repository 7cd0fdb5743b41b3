"""Integer reference of a QuantizedModel in numpy: TFLite's int8 reference kernels, op for op.

The oracle the exporters are tested against: it reproduces LiteRT 2.3.0's reference kernels
(`OpResolverType.BUILTIN_REF`). Every layer works on integers only:
  * int8 × int8 products accumulated exactly in int32/int64. Convolutions use a float64 BLAS matmul per
    kernel position as an *exact* integer dot product (every partial sum is an integer far below 2^53,
    checked by `_exact_dot`), then cast back to int64: no rounding can happen.
  * requantization by `quantize_multiplier` (31-bit multiplier + shift, computed from the float32 scales in
    double, as TFLite's Prepare does) and `multiply_by_quantized_multiplier` =
    `saturating_rounding_doubling_high_mul` (round half up, the gemmlowp nudge) then
    `rounding_divide_by_pot` (round half away from zero);
  * saturating casts to int8 and fused-activation clamps computed as `CalculateActivationRangeQuantized`.
LiteRT specifics, named where they are used (see /work/shared/EXPORT-NOTES.md):
  * per-channel FULLY_CONNECTED: the reference kernel rescales with
    `round(double(acc) * (double(s_in) * double(s_w[c]) / double(s_out)))` (C `round`, half away from zero),
    not with a fixed-point multiplier;
  * MEAN folds 1/N into the multiplier: shift' = min(floor(log2 N), 32, 31 + shift),
    mult' = (mult << shift') // N, applied to (sum - zp_in * N) with shift - shift';
  * ADD rescales both inputs to a common scale with left_shift 20 (TFLite's int8 add);
  * the table ops (qmodel.TABLE_OPS): a 256-entry int8 table (`table_for`), which export.tflite writes
    as CAST → ADD → GATHER (not TFLite's HARD_SWISH, whose int16 fixed-point kernel is kept here as
    `tflite_hardswish` for comparison, nor LOGISTIC / TANH, which fix the output scale).
XNNPACK (the default delegate) rounds some of these differently; it may differ from this by one code.
Only 8-bit activations exist here (4-bit activations are simulation-only).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from calibration.qmodel import CLAMP_OPS, TABLE_OPS, WEIGHTED_OPS, Op, QuantizedModel, input_codes
from ghnq.cli import UserError

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
INT16_MIN, INT16_MAX = -(1 << 15), (1 << 15) - 1


# ----------------------------------------------------------------------------------------------------
# Fixed-point helpers (tensorflow/lite/kernels/internal/common.h, quantization_util.cc, gemmlowp)


def quantize_multiplier(real: float) -> tuple[int, int]:
    """QuantizeMultiplier: real = m · 2^(shift - 31), m in [2^30, 2^31); frexp, then round half away."""
    if real == 0.0:
        return 0, 0
    q, shift = math.frexp(real)
    q_fixed = int(math.copysign(math.floor(abs(q) * (1 << 31) + 0.5), q))  # TfLiteRound
    if q_fixed == 1 << 31:
        q_fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return q_fixed, shift


def _trunc_div(x: np.ndarray, d: int) -> np.ndarray:
    """C integer division (truncation toward zero) for int64 arrays and a positive divisor."""
    q = np.abs(x) // d
    return np.where(x < 0, -q, q)


def saturating_rounding_doubling_high_mul(a: np.ndarray, b: int | np.ndarray) -> np.ndarray:
    """gemmlowp SaturatingRoundingDoublingHighMul (int32): (a·b + nudge) / 2^31, nudge = ±2^30 (round half up)."""
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    ab = a * b
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    res = _trunc_div(ab + nudge, 1 << 31)
    return np.where((a == INT32_MIN) & (b == INT32_MIN), INT32_MAX, res)


def rounding_divide_by_pot(x: np.ndarray, exponent: int | np.ndarray) -> np.ndarray:
    """gemmlowp RoundingDivideByPOT: x / 2^exponent rounded half away from zero."""
    x = np.asarray(x, np.int64)
    e = np.asarray(exponent, np.int64)
    mask = (np.int64(1) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> e) + (remainder > threshold)


def multiply_by_quantized_multiplier(x: np.ndarray, mult: int | np.ndarray, shift: int | np.ndarray) -> np.ndarray:
    """MultiplyByQuantizedMultiplier (int32, double rounding): left shift, high-mul, rounding right shift."""
    shift = np.asarray(shift, np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(np.asarray(x, np.int64) << left, mult),
                                  right)


def activation_range(op: Op, scale: float, zp: int, qmin: int = -128, qmax: int = 127) -> tuple[int, int]:
    """CalculateActivationRangeQuantized: clamp bounds of the fused activation, in output codes."""
    def quantize(f: float) -> int:
        v = np.float32(f) / np.float32(scale)  # float32 division, as the C++ float lambda
        return zp + int(math.copysign(math.floor(abs(float(v)) + 0.5), float(v)))

    fused = op.kind if op.kind in CLAMP_OPS else op.attrs.get("fused", "none")  # a standalone relu: its own range
    if fused in ("relu", "relu_0_to_1"):  # relu_0_to_1 is written as RELU; its (1/255, -128) range clamps at 1
        return max(qmin, quantize(0.0)), qmax
    if fused == "relu6":
        return max(qmin, quantize(0.0)), min(qmax, quantize(6.0))
    return qmin, qmax


def _exact_dot(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Integer matmul x[..., K] @ w[K, O] via float64 BLAS; exact because |partial sums| < 2^53 (asserted)."""
    bound = int(np.abs(x).max(initial=0)) * int(np.abs(w).max(initial=0)) * x.shape[-1]
    assert bound < 1 << 53, "integer dot product too large for an exact float64 accumulation"
    return (x.astype(np.float64) @ w.astype(np.float64)).astype(np.int64)


def _saturate_int8(x: np.ndarray) -> np.ndarray:
    return np.clip(x, -128, 127).astype(np.int8)


# ----------------------------------------------------------------------------------------------------
# Ops: one function each, NHWC int8 in, int8 out (the QM's tensors give scales and zero points)


def _conv_multipliers(s_in: float, s_w: np.ndarray, s_out: float) -> tuple[np.ndarray, np.ndarray]:
    """PopulateConvolutionQuantizationParams: per channel QuantizeMultiplier(double(s_in)·double(s_w)/double(s_out))."""
    pairs = [quantize_multiplier(float(s_in) * float(s) / float(s_out)) for s in s_w]
    return np.array([p[0] for p in pairs], np.int64), np.array([p[1] for p in pairs], np.int64)


def _windows(x: np.ndarray, op: Op, kh: int, kw: int, pad_value: int):
    """(i, j, x_slice) for every kernel position: x padded with `pad_value`, strided [N, Ho, Wo, C]."""
    t, b, left, r = op.attrs["padding"]
    sh, sw = op.attrs["stride"]
    dh, dw = op.attrs.get("dilation", [1, 1])
    xp = np.pad(x, ((0, 0), (t, b), (left, r), (0, 0)), constant_values=pad_value)
    ho = (xp.shape[1] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[2] - dw * (kw - 1) - 1) // sw + 1
    for i in range(kh):
        for j in range(kw):
            yield i, j, xp[:, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw, :]


def conv2d(op: Op, x: np.ndarray, w: np.ndarray, bias: np.ndarray, zp_in: int, s_in: float, s_w: np.ndarray,
           s_out: float, zp_out: int) -> np.ndarray:
    """reference_integer_ops::ConvPerChannel: out-of-range taps contribute 0 (= input padded with zp_in).
    Grouped when the filter has fewer input channels than x (TFLite's rule): groups = C_in / w.shape[1], and
    output channel o reads input channels [g·I, (g+1)·I) of its group g = o // (O / groups)."""
    xo = x.astype(np.int64) - zp_in
    i_per, groups = w.shape[1], x.shape[3] // w.shape[1]
    o_per = w.shape[0] // groups
    acc = None
    for i, j, xs in _windows(xo, op, w.shape[2], w.shape[3], 0):
        part = np.concatenate([_exact_dot(xs[..., g * i_per:(g + 1) * i_per],
                                          w[g * o_per:(g + 1) * o_per, :, i, j].T.astype(np.int64))
                               for g in range(groups)], axis=-1)
        acc = part if acc is None else acc + part
    acc = acc + bias.astype(np.int64)
    mult, shift = _conv_multipliers(s_in, s_w, s_out)
    y = multiply_by_quantized_multiplier(acc, mult, shift) + zp_out
    lo, hi = activation_range(op, s_out, zp_out)
    return np.clip(y, lo, hi).astype(np.int8)


def depthwise_conv2d(op: Op, x: np.ndarray, w: np.ndarray, bias: np.ndarray, zp_in: int, s_in: float,
                     s_w: np.ndarray, s_out: float, zp_out: int) -> np.ndarray:
    """reference_integer_ops::DepthwiseConvPerChannel: output channel c reads input channel c // multiplier."""
    m = op.attrs.get("depth_multiplier", 1)
    xo = np.repeat(x.astype(np.int64) - zp_in, m, axis=3) if m > 1 else x.astype(np.int64) - zp_in
    acc = None
    for i, j, xs in _windows(xo, op, w.shape[2], w.shape[3], 0):
        part = xs * w[:, 0, i, j].astype(np.int64)
        acc = part if acc is None else acc + part
    acc = acc + bias.astype(np.int64)
    mult, shift = _conv_multipliers(s_in, s_w, s_out)
    y = multiply_by_quantized_multiplier(acc, mult, shift) + zp_out
    lo, hi = activation_range(op, s_out, zp_out)
    return np.clip(y, lo, hi).astype(np.int8)


def fully_connected(op: Op, x: np.ndarray, w: np.ndarray, bias: np.ndarray, zp_in: int, s_in: float,
                    s_w: np.ndarray, s_out: float, zp_out: int) -> np.ndarray:
    """reference_integer_ops::FullyConnectedPerChannel as LiteRT 2.3.0 runs it: the int32 accumulator is
    rescaled by round(double(acc) · double(s_in)·double(s_w[c])/double(s_out)), half away from zero."""
    acc = _exact_dot(x.astype(np.int64) - zp_in, w.T.astype(np.int64)) + bias.astype(np.int64)
    eff = np.array([float(s_in) * float(s) / float(s_out) for s in s_w], np.float64)
    prod = acc.astype(np.float64) * eff
    y = (np.sign(prod) * np.floor(np.abs(prod) + 0.5)).astype(np.int64) + zp_out
    lo, hi = activation_range(op, s_out, zp_out)
    return np.clip(y, lo, hi).astype(np.int8)


def add(op: Op, a: np.ndarray, b: np.ndarray, qa: tuple[float, int], qb: tuple[float, int],
        qo: tuple[float, int]) -> np.ndarray:
    """reference_integer_ops::Add (int8): both inputs rescaled to 2·max(s_a, s_b) with left_shift 20. SUB (int8,
    sub.cc's general path) is the same arithmetic with the rescaled b subtracted (op kind "sub")."""
    left_shift = 20
    twice_max = 2.0 * max(qa[0], qb[0])
    ma, sa = quantize_multiplier(qa[0] / twice_max)
    mb, sb = quantize_multiplier(qb[0] / twice_max)
    mo, so = quantize_multiplier(twice_max / ((1 << left_shift) * qo[0]))
    xa = (a.astype(np.int64) - qa[1]) << left_shift
    xb = (b.astype(np.int64) - qb[1]) << left_shift
    # MultiplyByQuantizedMultiplierSmallerThanOneExp = high-mul then rounding right shift by -shift
    ya = rounding_divide_by_pot(saturating_rounding_doubling_high_mul(xa, ma), -sa)
    yb = rounding_divide_by_pot(saturating_rounding_doubling_high_mul(xb, mb), -sb)
    raw = ya - yb if op.kind == "sub" else ya + yb
    y = rounding_divide_by_pot(saturating_rounding_doubling_high_mul(raw, mo), -so) + qo[1]
    lo, hi = activation_range(op, qo[0], qo[1])
    return np.clip(y, lo, hi).astype(np.int8)


def mul_scale(s_a: float, s_b: float, s_out: float) -> float:
    """MUL's Prepare: `input1->params.scale * input2->params.scale / output->params.scale`, in float32 (the
    operands are floats; only the result is widened to double). A double computation differs from it in the last
    bits, which moved 254 of 1.2 M codes of a tiny-mbv2 SE product by one step (measured against LiteRT 2.3.0's
    reference kernel; float32 matches it code for code)."""
    return float(np.float32(np.float32(s_a) * np.float32(s_b)) / np.float32(s_out))


def mul(op: Op, a: np.ndarray, b: np.ndarray, qa: tuple[float, int], qb: tuple[float, int],
        qo: tuple[float, int]) -> np.ndarray:
    """reference_integer_ops::Mul (int8, broadcasting): (a - zp_a)(b - zp_b) · QuantizeMultiplier(s_a s_b / s_o)."""
    m, s = quantize_multiplier(mul_scale(qa[0], qb[0], qo[0]))
    prod = (a.astype(np.int64) - qa[1]) * (b.astype(np.int64) - qb[1])
    y = multiply_by_quantized_multiplier(prod, m, s) + qo[1]
    lo, hi = activation_range(op, qo[0], qo[1])
    return np.clip(y, lo, hi).astype(np.int8)


def mean_multiplier(s_in: float, s_out: float, n: int) -> tuple[int, int]:
    """LiteRT 2.3.0 QuantizedMeanOrSum: QuantizeMultiplier(s_in/s_out) with 1/N folded in (truncating)."""
    mult, shift = quantize_multiplier(float(s_in) / float(s_out))
    s = min(n.bit_length() - 1, 32, 31 + shift)  # 63 - CountLeadingZeros(N) = floor(log2 N)
    return int((mult << s) // n), shift - s


def mean(op: Op, x: np.ndarray, qi: tuple[float, int], qo: tuple[float, int]) -> np.ndarray:
    """reference_ops::QuantizedMeanOrSum (LiteRT 2.3.0) over H, W: 1/N folded into the multiplier."""
    n = x.shape[1] * x.shape[2]
    mult, shift = mean_multiplier(qi[0], qo[0], n)
    total = x.astype(np.int64).sum(axis=(1, 2), keepdims=op.attrs["keepdims"]) - qi[1] * n
    y = multiply_by_quantized_multiplier(total, mult, shift) + qo[1]
    return _saturate_int8(y)


def max_pool2d(op: Op, x: np.ndarray) -> np.ndarray:
    """reference_integer_ops::MaxPool: max over in-range taps (padding is never a candidate)."""
    kh, kw = op.attrs["kernel"]
    out = None
    for _, _, xs in _windows(x.astype(np.int16), op, kh, kw, -32768):
        out = xs if out is None else np.maximum(out, xs)
    return _saturate_int8(out)


def avg_pool2d(op: Op, x: np.ndarray) -> np.ndarray:
    """reference_integer_ops::AveragePool: sum of in-range taps / their count, rounded half away from zero."""
    kh, kw = op.attrs["kernel"]
    total = count = None
    ones = np.ones(x.shape[:3] + (1,), np.int64)
    taps = zip(_windows(x.astype(np.int64), op, kh, kw, 0), _windows(ones, op, kh, kw, 0), strict=True)
    for (_, _, xs), (_, _, cs) in taps:
        total = xs if total is None else total + xs
        count = cs if count is None else count + cs
    half = count // 2
    y = np.where(total > 0, (total + half) // count, -((half - total) // count))  # C: truncating division
    return _saturate_int8(y)


def _srdhm16(a: np.ndarray, b: int) -> np.ndarray:
    """gemmlowp SaturatingRoundingDoublingHighMul for int16: (a·b + nudge) / 2^15, nudge = ±2^14."""
    ab = a.astype(np.int64) * b
    res = _trunc_div(ab + np.where(ab >= 0, 1 << 14, 1 - (1 << 14)), 1 << 15)
    return np.where((a == INT16_MIN) & (b == INT16_MIN), INT16_MAX, res)


def _sdhm16(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """reference_ops::SaturatingDoublingHighMul (int16): a·b / 2^15 truncated toward zero (no rounding)."""
    ab = a.astype(np.int64) * b.astype(np.int64)
    return np.where((a == INT16_MIN) & (b == INT16_MIN), INT16_MAX, _trunc_div(ab, 1 << 15))


def _sat_left_shift16(x: np.ndarray, amount: int) -> np.ndarray:
    return np.clip(x.astype(np.int64) * (1 << amount), INT16_MIN, INT16_MAX)


def _downscale_to_int16(m: int) -> int:
    """DownScaleInt32ToInt16Multiplier: round the Q31 multiplier to Q15."""
    return INT16_MAX if m >= INT32_MAX - (1 << 15) else (m + (1 << 15)) >> 16


@lru_cache(maxsize=4096)
def table_for(kind: str, qi: tuple[float, int], qo: tuple[float, int], **params: float | None) -> np.ndarray:
    """A table op (qmodel.TABLE_OPS) as one integer function: table[q + 128] = output code of input code q
    (read-only). `params` are the op's attrs: leaky_relu's / elu's alpha, softplus's beta and threshold,
    hardtanh's min and max.

    Why a table, and this one: ExecuTorch's XNNPACK partitioner lowers these ops only in fp32 (inside the
    delegate: dequantize → float32 op → quantize), while TFLite's own int8 kernels compute something else
    (HARD_SWISH: `tflite_hardswish`, up to 1 code away; LOGISTIC / TANH require fixed output scales). A table is
    the one integer function every runtime can evaluate identically, so export.tflite writes this table
    (CAST → ADD 128 → GATHER) and the sim uses it in every rounding mode. It is ExecuTorch's fp32 computation,
    calibration.sim.et_table (measured code for code). Built once per (kind, qi, qo, params).
    """
    from calibration.sim import et_table  # here, not at the top: calibration.sim imports this module

    table = et_table(kind, (float(qi[0]), int(qi[1])), (float(qo[0]), int(qo[1])),
                     **{k: None if v is None else float(v) for k, v in params.items()})
    table.flags.writeable = False  # shared by every caller through the cache
    return table


def op_table(op: Op, qi: tuple[float, int], qo: tuple[float, int]) -> np.ndarray:
    """`table_for` of one QM op (its kind and attrs); qi / qo are (scale, zp) or longer. A prelu has one table per
    channel, [C, 256]: channel c's is leaky_relu's with alpha[c]."""
    qi, qo = (float(qi[0]), int(qi[1])), (float(qo[0]), int(qo[1]))
    if op.kind == "prelu":
        return np.stack([table_for("leaky_relu", qi, qo, alpha=a) for a in op.attrs["alpha"]])
    return table_for(op.kind, qi, qo, **op.attrs)


def table_lookup(op: Op, x: np.ndarray, qi: tuple[float, int], qo: tuple[float, int]) -> np.ndarray:
    """int8 table op: integer codes in → `op_table` → integer codes out (channels last: a prelu's row per channel)."""
    table = op_table(op, qi, qo)
    if table.ndim == 2:
        return table.ravel()[x.astype(np.int64) + 128 + 256 * np.arange(x.shape[-1])]
    return table[x.astype(np.int64) + 128]


def tflite_hardswish(x: np.ndarray, qi: tuple[float, int], qo: tuple[float, int]) -> np.ndarray:
    """reference_ops::HardSwish<int8> with HardSwishPrepare's params (float32 scale arithmetic): TFLite's own
    HARD_SWISH, which the exporter no longer writes (it differs from ExecuTorch's; see `table_for`)."""
    hires = np.float32(1.0 / 128.0) * np.float32(qi[0])
    om, oe = quantize_multiplier(float(np.float32(hires / np.float32(qo[0]))))
    rm, re_ = quantize_multiplier(float(np.float32(hires / np.float32(3.0 / 32768.0))))
    om16, rm16 = _downscale_to_int16(om), _downscale_to_int16(rm)
    if oe > 0:
        raise UserError("hardswish: output scale below input scale / 128 is refused by TFLite (exponent > 0)")
    v = (x.astype(np.int64) - qi[1]) * (1 << 7)  # input_value_on_hires_input_scale (fits int16)
    pre_out = _srdhm16(v, om16)
    r = v
    if re_ > 0:
        r = _sat_left_shift16(r, re_ - 1)
    r = _srdhm16(r, rm16)
    if re_ > 0:
        r = _sat_left_shift16(r, 1)
    if re_ < 0:
        r = rounding_divide_by_pot(r, -re_)
    r = (r + (1 << 15)) >> 1
    y = rounding_divide_by_pot(_sdhm16(r, pre_out), -oe) + qo[1]
    return _saturate_int8(y)


def clamp(op: Op, x: np.ndarray, q: tuple[float, int]) -> np.ndarray:
    """RELU / RELU6 (int8) with the output at the input's (scale, zp): the multiplier is exactly 1, so the kernel
    is a clamp of the codes to CalculateActivationRangeQuantized's bounds."""
    lo, hi = activation_range(op, *q)
    return np.clip(x, lo, hi).astype(np.int8)


SOFTMAX_MAX_EXP_BITS = 22  # 2^k · 2^bits (8) must stay below 2^31 too: (2^bits · E + S // 2) is an int32


def softmax_exp_table(s_in: float, classes: int) -> list[int]:
    """The softmax op's exp table: entry i = round(2^k · exp(s_in · (i − 255))) for a code difference i − 255 to the
    row's largest code, k the largest fixed-point precision (≤ 22) at which C of them sum below 2^31. Computed once,
    in float64, at calibration; the QM carries it, so every runtime reads the same integers."""
    k = min(SOFTMAX_MAX_EXP_BITS, int(np.floor(np.log2((2**31 - 1) / classes))))
    if k < 8:
        raise UserError(f"softmax over {classes} features: too many for an int32 sum of 8-bit exponentials")
    d = np.arange(-255, 1, dtype=np.float64)
    return [int(v) for v in np.floor(np.exp(np.float64(np.float32(s_in)) * d) * 2.0**k + 0.5)]


def softmax(op: Op, x: np.ndarray, bits: int = 8) -> np.ndarray:
    """Integer softmax over the last axis of int8 codes x [N, C]: with d = x − max(x) (≥ −255) and
    E = exp_table[d + 255] (int32), S = ΣE, the output code is (2^bits · E + S // 2) // S − 2^(bits−1) (a rounding
    division, half up), at most 2^(bits−1) − 1; the output scale is 1/2^bits. Every step is an int32 operation
    that TFLite builtins (CAST, REDUCE_MAX, SUB, GATHER, SUM, MUL, FLOOR_DIV, MINIMUM) and ExecuTorch's portable
    integer kernels compute identically (no TFLite SOFTMAX: its int8 kernels differ from XNNPACK's fp32 one)."""
    table = np.asarray(op.attrs["exp_table"], np.int64)
    q = x.astype(np.int64)
    e = table[q - q.max(axis=-1, keepdims=True) + 255]
    total = e.sum(axis=-1, keepdims=True)
    y = (e * (1 << bits) + total // 2) // total - (1 << (bits - 1))
    return np.minimum(y, (1 << (bits - 1)) - 1).astype(np.int8)


def nearest_source_index(n_in: int, n_out: int) -> np.ndarray:
    """GetNearestNeighbor (align_corners and half_pixel_centers false): output position i reads input
    min(floor(i · float32(n_in / n_out)), n_in − 1), the product rounded to float32. ExecuTorch's portable
    upsample_nearest2d computes the same. For a whole factor f this is i // f whenever float32(1 / f) ≥ 1 / f or the
    product's rounding lands on the integer; calibration checks it for every resize it lowers."""
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)


def resize_nearest(op: Op, x: np.ndarray) -> np.ndarray:
    """RESIZE_NEAREST_NEIGHBOR (int8): the output shares the input's (scale, zp), so codes are copied."""
    _, h, w, _ = x.shape
    fh, fw = op.attrs["factor"]
    return x[:, nearest_source_index(h, h * fh)][:, :, nearest_source_index(w, w * fw)]


def pad(op: Op, x: np.ndarray, zp: int) -> np.ndarray:
    """PAD (int8): pads with the zero point."""
    t, b, left, r = op.attrs["padding"]
    return np.pad(x, ((0, 0), (t, b), (left, r), (0, 0)), constant_values=zp)


def reshape(op: Op, x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], *op.attrs["shape"][1:])


# ----------------------------------------------------------------------------------------------------
# Graph


def concat(op: Op, xs: list[np.ndarray]) -> np.ndarray:
    """CONCATENATION on the channel (last) axis; inputs and output share (scale, zp), so codes are copied."""
    return np.concatenate(xs, axis=-1)


def gather(op: Op, x: np.ndarray) -> np.ndarray:
    """GATHER on the channel (last) axis; output shares the input's (scale, zp), so codes are copied."""
    return np.take(x, op.attrs["indices"], axis=3)


def check_supported(qm: QuantizedModel) -> None:
    for name, t in qm.tensors.items():
        if not t.is_const and t.bits != 8:
            raise UserError(f"tensor {name!r}: {t.bits}-bit activations exist in the simulation only; the integer "
                            "reference (and every exporter) needs 8-bit activations")


def run_op(qm: QuantizedModel, op: Op, env: dict[str, np.ndarray]) -> np.ndarray:
    T = qm.tensors
    q = {n: T[n].qparams for n in op.inputs + op.outputs if not T[n].is_const}
    out = op.outputs[0]
    k = op.kind
    if k in WEIGHTED_OPS:
        x, w, b = op.inputs
        fn = {"conv2d": conv2d, "depthwise_conv2d": depthwise_conv2d, "fully_connected": fully_connected}[k]
        return fn(op, env[x], T[w].data, T[b].data, q[x][1], q[x][0], T[w].scale, q[out][0], q[out][1])
    if k in ("add", "sub"):
        return add(op, env[op.inputs[0]], env[op.inputs[1]], q[op.inputs[0]], q[op.inputs[1]], q[out])
    if k == "mul":
        return mul(op, env[op.inputs[0]], env[op.inputs[1]], q[op.inputs[0]], q[op.inputs[1]], q[out])
    if k == "mean":
        return mean(op, env[op.inputs[0]], q[op.inputs[0]], q[out])
    if k == "max_pool2d":
        return max_pool2d(op, env[op.inputs[0]])
    if k == "avg_pool2d":
        return avg_pool2d(op, env[op.inputs[0]])
    if k in TABLE_OPS:
        return table_lookup(op, env[op.inputs[0]], q[op.inputs[0]], q[out])
    if k in CLAMP_OPS:
        return clamp(op, env[op.inputs[0]], q[out])
    if k == "resize_nearest":
        return resize_nearest(op, env[op.inputs[0]])
    if k == "softmax":
        return softmax(op, env[op.inputs[0]])
    if k == "pad":
        return pad(op, env[op.inputs[0]], q[op.inputs[0]][1])
    if k == "reshape":
        return reshape(op, env[op.inputs[0]])
    if k == "concat":
        return concat(op, [env[n] for n in op.inputs])
    if k == "gather":
        return gather(op, env[op.inputs[0]])
    raise UserError(f"op {k!r} ({op.source}) has no integer reference kernel")


def run(qm: QuantizedModel, images: np.ndarray, capture: bool = False, batch_size: int = 100
        ) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
    """uint8 NHWC images → int8 logit codes [N, classes] (+ every tensor's int8 codes, NHWC, if capture)."""
    check_supported(qm)
    outs, caps = [], {}
    for i in range(0, len(images), batch_size):
        env = {qm.input: input_codes(images[i:i + batch_size])}
        for op in qm.ops:
            env[op.outputs[0]] = run_op(qm, op, env)
        outs.append(env[qm.output])
        if capture:
            for n, v in env.items():
                caps.setdefault(n, []).append(v)
    logits = np.concatenate(outs)
    return (logits, {n: np.concatenate(v) for n, v in caps.items()}) if capture else logits
