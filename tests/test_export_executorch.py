"""export.executorch: the .pte carries the QuantizedModel's exact parameters, is fully delegated to XNNPACK,
and the real ExecuTorch runtime computes what the LiteRT artifact of the same QM computes.

* the converted PT2E program's q/dq parameters, int8 weights and the int32 bias XNNPACK derives equal the QM's;
  a QM that differs by one number is refused;
* every compute op is inside the XNNPACK delegate; int8 input and output in the runtime;
* the runtime's logit codes equal simulate(rounding="executorch") code for code (XNNPACK's int8 kernels plus the
  hardswish / avg pool ExecuTorch runs in fp32 inside the delegate; each of those alone on every input code),
  and LiteRT + XNNPACK's of the same QM wherever no such op exists;
* the command: report.json with the TFLite exporter's keys; bad input → exit 2, nothing written.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from calibration import calibrate
from calibration.qmodel import Op, QuantizedModel, Tensor
from calibration.qmodel import load as load_qm
from calibration.sim import input_codes, simulate
from export import executorch as E
from ghnq.cli import UserError, run_cli
from ghnq.data import load_eval_images
from ghnq.spec import build_model, load_spec
from tests.nets import USER_NETS

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted(p.stem for p in (ROOT / "specs").glob("*.yaml"))
N_IMAGES = 32


# ----------------------------------------------------------------------------------------------------
# Models under test: small nets with the ops no spec has (max / avg pool, zero pad, hardswish; a flatten of a
# spatial map, concat, SiLU / sigmoid / tanh / leaky relu, grouped convs: tests/nets.py), and the
# specs, each calibrated on real CIFAR-10 images through calibration.calibrate


class PoolNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.conv = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.avg = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stem(x))
        y = self.avg(self.conv(self.pad(x)))
        return self.fc(torch.flatten(self.gap(y), 1))


def _random_init(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return model


@cache
def get(name: str) -> tuple[QuantizedModel, np.ndarray]:
    """(QM, real test images): seeded random weights, BN re-estimated, calibrated on 64 real train images."""
    nets = {"poolnet": PoolNet, **USER_NETS}
    model = nets[name]() if name in nets else build_model(load_spec(ROOT / "specs" / f"{name}.yaml"))
    calib, _, _ = load_eval_images(64, split="train", quiet=True)
    images, _, _ = load_eval_images(N_IMAGES, split="test", quiet=True)
    qm = calibrate(_random_init(model), calib, bn_recalibrate=True, progress=False, meta={"name": name})
    return qm, images


@cache
def program(name: str) -> E.Program:
    return E.lower(get(name)[0])


FAST = ["poolnet", "flatnet", "firenet", "swishnet", "groupnet", "shufflenet", "torchpoolnet", "padnet",
        "spellednet", "preactnet", "widepoolnet", "dualpathnet", "tiny-mbv2"]
ALL = FAST + [pytest.param(s, marks=pytest.mark.slow) for s in SPECS if s not in FAST]


# ----------------------------------------------------------------------------------------------------
# The program carries the QM's numbers


@pytest.mark.parametrize("name", ALL)
def test_converted_program_carries_the_qm_parameters(name: str) -> None:
    qm, _ = get(name)
    converted = E.quantize(qm)
    p = E.read_params(qm, converted)
    assert not p.dequant_mismatch
    for n, t in qm.tensors.items():
        if t.is_const:
            continue
        scale, zp = p.activations[n]  # the quantize node of every activation, the input included
        assert np.float32(scale).tobytes() == np.asarray(t.scale, np.float32)[:1].tobytes(), n
        assert float(np.float32(scale)) == scale and zp == int(t.zero_point[0]), n
    gemms = [op for op in qm.ops if op.kind in E.WEIGHTED_OPS]
    assert len(p.weights) == len(gemms) and len(p.biases) == len(gemms)
    for op in gemms:
        codes, scale = p.weights[op.inputs[1]]
        w, b = qm.tensors[op.inputs[1]], qm.tensors[op.inputs[2]]
        assert codes.dtype == np.int8 and np.array_equal(codes, w.data), op.inputs[1]
        assert scale.tobytes() == np.asarray(w.scale, np.float32).tobytes(), op.inputs[1]
        assert np.array_equal(p.biases[op.inputs[2]], b.data), op.inputs[2]  # what XNNPACK serializes
    # the only tensors with q/dq are the QM's (plus an explicit pad carrying its input's numbers)
    assert set(p.activations) - {n for n, t in qm.tensors.items() if not t.is_const} <= {
        f"{op.outputs[0]}/pad" for op in qm.ops}
    E.check_converted(qm, converted)


def test_a_qm_that_differs_by_one_number_is_refused() -> None:
    qm, _ = get("tiny-mbv2")
    converted = E.quantize(qm)
    name = qm.ops[3].outputs[0]
    other = copy.deepcopy(qm)
    other.tensors[name].zero_point = other.tensors[name].zero_point + 1
    with pytest.raises(RuntimeError, match=name):
        E.check_converted(other, converted)
    other = copy.deepcopy(qm)
    w = other.tensors[qm.ops[0].inputs[1]]
    w.scale = (w.scale * np.float32(1.0001)).astype(np.float32)
    with pytest.raises(RuntimeError, match="scales differ"):
        E.check_converted(other, converted)
    other = copy.deepcopy(qm)
    b = other.tensors[qm.ops[0].inputs[2]]
    b.data = b.data.copy()
    b.data[0] += 1
    with pytest.raises(RuntimeError, match="int32 bias"):
        E.check_converted(other, converted)


def test_shared_parameters_are_the_qms_sharing() -> None:
    """Pools, pad and reshape share their input's (scale, zp) because the QM says so — and the QM's own
    `mean` parameters survive (the XNNPACK quantizer would have tied them to the mean's input)."""
    qm, _ = get("poolnet")
    p = E.read_params(qm, E.quantize(qm))
    kinds = {op.kind for op in qm.ops}
    assert {"max_pool2d", "avg_pool2d", "pad", "hardswish", "mean", "reshape"} <= kinds
    for op in qm.ops:
        if op.kind in ("max_pool2d", "avg_pool2d", "pad", "reshape"):
            assert p.activations[op.outputs[0]] == p.activations[op.inputs[0]], op.kind
    mean = next(op for op in qm.ops if op.kind == "mean")
    assert p.activations[mean.outputs[0]] != p.activations[mean.inputs[0]]


# ----------------------------------------------------------------------------------------------------
# Delegation and int8 I/O


@pytest.mark.parametrize("name", ALL)
def test_fully_delegated_with_int8_io(name: str, tmp_path: Path) -> None:
    prog = program(name)
    d = prog.delegation
    assert d["delegated_subgraphs"] == 1 and d["outside_delegate"] == {} and d["compute_outside_delegate"] == {}
    qm, _ = get(name)
    gemms = sum(op.kind in ("conv2d", "depthwise_conv2d") for op in qm.ops)
    assert d["by_operator"]["aten_convolution_default"] == {"delegated": gemms, "not_delegated": 0}
    path = tmp_path / "m.pte"
    path.write_bytes(prog.data)
    meta = E.ExecuTorchRunner(path).method.metadata
    tin, tout = meta.input_tensor_meta(0), meta.output_tensor_meta(0)
    _, h, w, c = qm.tensors[qm.input].shape
    assert int(tin.dtype()) == 1 and list(tin.sizes()) == [1, c, h, w]  # ScalarType 1 = int8
    assert int(tout.dtype()) == 1 and list(tout.sizes()) == [1, 10]
    # the I/O quantization travels in the .pte as ExecuTorch's config methods
    from executorch.runtime import Runtime

    prog = Runtime.get().load_program(path)
    for kind, tensor in (("input", qm.tensors[qm.input]), ("output", qm.tensors[qm.output])):
        scale = prog.load_method(f"forward_{kind}0_scale").execute([])[0]
        zp = prog.load_method(f"forward_{kind}0_zp").execute([])[0]
        assert np.float32(scale) == tensor.scale[0] and zp == int(tensor.zero_point[0]), kind


# ----------------------------------------------------------------------------------------------------
# What the runtime computes


# ExecuTorch's partitioner runs hardswish / avg pool / pad in fp32 inside the delegate. Hardswish: the TFLite writer
# writes the very table that computes (CAST → ADD → GATHER), so LiteRT agrees code for code. Avg pool: LiteRT's
# XNNPACK delegate runs int8 AVERAGE_POOL_2D (int32 sum, rounded division) where ExecuTorch runs float32 pooling;
# ties round differently, ≤ 1 code per op, so the models with an avg pool (poolnet, torchpoolnet, preactnet,
# widepoolnet) stay out.
# Each runtime still equals its own sim code for code (test_runtime_equals_the_executorch_sim and
# tests/test_xnnpack_rounding.py).
FP32_INSIDE_DELEGATE = {"poolnet", "torchpoolnet", "preactnet", "widepoolnet"}
AGREE = [p for p in ALL if getattr(p, "values", [p])[0] not in FP32_INSIDE_DELEGATE]


def _run_et(name: str, tmp_path: Path) -> tuple[QuantizedModel, np.ndarray, np.ndarray]:
    qm, images = get(name)
    path = tmp_path / "m.pte"
    path.write_bytes(program(name).data)
    return qm, images, E.ExecuTorchRunner(path)(input_codes(images))


@pytest.mark.parametrize("name", AGREE)
def test_runtime_agrees_with_litert_xnnpack(name: str, tmp_path: Path) -> None:
    """Same QM, two formats, two runtimes: the logit codes are equal (both run XNNPACK's int8 kernels, and
    hardswish is the same table in both)."""
    from export.tflite import LiteRTRunner, build_tflite

    qm, images, et = _run_et(name, tmp_path)
    tfl = LiteRTRunner(build_tflite(qm), "xnnpack")(input_codes(images))
    assert et.dtype == np.int8 and et.shape == tfl.shape
    assert np.array_equal(et, tfl), f"{int((et != tfl).sum())} of {et.size} logit codes differ"


@pytest.mark.parametrize("name", ALL)
def test_runtime_equals_the_executorch_sim(name: str, tmp_path: Path) -> None:
    """Code for code on every spec, random weights included (an exact sim is not hurt by amplification)."""
    qm, images, et = _run_et(name, tmp_path)
    sim = simulate(qm, images, rounding="executorch")
    assert np.array_equal(et, sim), f"{int((et != sim).sum())} of {et.size} logit codes differ"
    if name == "poolnet":  # its avg pool has ties: XNNPACK's int8 arithmetic alone does not explain the runtime
        assert not np.array_equal(et, simulate(qm, images, rounding="xnnpack"))


def test_channel_gathers_take_the_delegated_form_where_one_exists(tmp_path: Path) -> None:
    """A channel slice runs as slice, a channel shuffle as view → transpose → view, both inside the XNNPACK
    delegate (shufflenet: one delegate); any other channel selection as index_select on the portable kernels,
    between two delegates, still code for code with the sim; the report says what ran outside."""
    qm, _ = get("shufflenet")
    forms = [E.gather_form(op.attrs["indices"], qm.tensors[op.inputs[0]].shape[-1])[0]
             for op in qm.ops if op.kind == "gather"]
    assert sorted(set(forms)) == ["shuffle", "slice"] and forms.count("shuffle") == 2
    d = program("picknet").delegation
    assert d["outside_delegate"] == {"aten_index_select_default": 1} and d["delegated_subgraphs"] == 2
    assert d["compute_outside_delegate"] == {}
    qm, images, et = _run_et("picknet", tmp_path)
    assert np.array_equal(et, simulate(qm, images, rounding="executorch"))
    assert E.gather_form([6, 0, 3, 3, 1], 8)[0] == "index" and E.gather_form([2, 3, 4], 8) == ("slice", 2, 5)
    assert E.gather_form([0, 3, 1, 4, 2, 5], 6) == ("shuffle", 2, 0)  # 2 groups of 3, transposed


def test_elu_net_runs_code_for_code_beside_the_delegate(tmp_path: Path) -> None:
    """A net with two ELUs (alpha 1 and 0.5): three delegate partitions with the ELUs between them on the
    portable kernels, named in the report, and the runtime's codes are the sim's."""
    qm, _ = get("elunet")
    assert sorted(op.attrs["alpha"] for op in qm.ops if op.kind == "elu") == [0.5, 1.0]
    d = program("elunet").delegation
    assert d["outside_delegate"] == {"aten_elu_default": 2} and d["delegated_subgraphs"] == 3
    qm, images, et = _run_et("elunet", tmp_path)
    assert np.array_equal(et, simulate(qm, images, rounding="executorch"))


def test_mish_softplus_net_runs_code_for_code_beside_the_delegate(tmp_path: Path) -> None:
    """CSPDarknet-style Mish (five modules and one F.mish), a clamp(-0.2, 3) and a Softplus(beta=2, threshold=5): each
    runs whole on the portable kernels in float64 between delegate partitions (named in the report, no conv or add
    outside the delegate), and the runtime's logits are the sim's and LiteRT XNNPACK's, code for code."""
    from export.tflite import LiteRTRunner, build_tflite

    qm, _ = get("mishnet")
    kinds = [op.kind for op in qm.ops]
    assert kinds.count("mish") == 6 and kinds.count("softplus") == 1 and kinds.count("hardtanh") == 1
    assert [op.attrs for op in qm.ops if op.kind == "softplus"] == [{"beta": 2.0, "threshold": 5.0}]
    d = program("mishnet").delegation
    assert d["outside_delegate"]["aten_tanh_default"] == 6 and d["outside_delegate"]["aten_div_tensor"] == 1
    assert d["outside_delegate"]["aten_clamp_default"] == 1  # the hardtanh, in float64 too
    assert d["compute_outside_delegate"] == {}
    qm, images, et = _run_et("mishnet", tmp_path)
    assert np.array_equal(et, simulate(qm, images, rounding="executorch"))
    assert np.array_equal(et, LiteRTRunner(build_tflite(qm), "xnnpack")(input_codes(images)))


def test_nearest_upsampling_runs_code_for_code_beside_the_delegate(tmp_path: Path) -> None:
    """XNNPACK's partitioner has no nearest resize: each of the three upsamplings runs on the portable kernels
    between delegate partitions (named in the report, no compute op outside), a copy of codes, and the runtime's
    logits are the sim's and LiteRT XNNPACK's."""
    from export.tflite import LiteRTRunner, build_tflite

    d = program("upsamplenet").delegation
    assert d["outside_delegate"] == {"aten_upsample_nearest2d_vec": 3} and d["delegated_subgraphs"] == 4
    assert d["compute_outside_delegate"] == {}
    qm, images, et = _run_et("upsamplenet", tmp_path)
    assert np.array_equal(et, simulate(qm, images, rounding="executorch"))
    assert np.array_equal(et, LiteRTRunner(build_tflite(qm), "xnnpack")(input_codes(images)))


def _t(name: str, shape: list[int], s: float, zp: int) -> Tensor:
    return Tensor(name, shape, "int8", np.array([s], np.float32), np.array([zp]))


@pytest.mark.parametrize("s_in, zp_in, s_out, zp_out", [(0.0655, -12, 0.00725, -94), (0.05, 0, 0.02, -100)])
def test_fp32_ops_inside_the_delegate_alone(s_in: float, zp_in: int, s_out: float, zp_out: int,
                                            tmp_path: Path) -> None:
    """hardswish on all 256 input codes (and 3 images of random codes), then a 3×3 avg pool with padding (counts
    4, 6, 9: ties): the runtime's codes are the executorch sim's, one by one; the xnnpack sim's (TFLite's int8
    hardswish table, TFLite's avg pool rounding) are not."""
    shape = [1, 16, 16, 1]
    qm = QuantizedModel([Op("hardswish", ["x"], ["h"]),
                         Op("avg_pool2d", ["h"], ["y"], {"kernel": [3, 3], "stride": [1, 1], "padding": [1, 1, 1, 1]})],
                        {"x": _t("x", shape, s_in, zp_in), "h": _t("h", shape, s_out, zp_out),
                         "y": _t("y", shape, s_out, zp_out)}, "x", "y")
    assert E.fp32_inside_delegate(qm) == {"avg_pool2d": 1, "hardswish": 1}
    path, _ = E.write_pte(qm, tmp_path / "m.pte")
    x = np.concatenate([np.arange(-128, 128, dtype=np.int8).reshape(1, 16, 16, 1),
                        np.random.default_rng(0).integers(-128, 128, (3, 16, 16, 1)).astype(np.int8)])
    got = E.ExecuTorchRunner(path)(x)  # NCHW [N, 1, 16, 16]
    from calibration.sim import Simulator

    want = Simulator(qm, rounding="executorch").forward(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape and np.array_equal(got, want), int((got != want).sum())
    other = Simulator(qm, rounding="xnnpack").forward(torch.from_numpy(x)).numpy()
    assert (got != other).sum() >= 4  # measured: 10 and 56 codes differ (avg pool ties, 1 and 11 table entries)


TABLES = [("hardswish", {}), ("sigmoid", {}), ("silu", {}), ("tanh", {}), ("leaky_relu", {"alpha": 0.1}),
          ("gelu", {}), ("elu", {"alpha": 1.0}), ("elu", {"alpha": 0.5}),
          ("mish", {}), ("softplus", {"beta": 1.0, "threshold": 20.0}), ("softplus", {"beta": 2.0, "threshold": 3.0}),
          ("hardtanh", {"min": -0.5, "max": 1.25}), ("hardtanh", {"min": None, "max": 2.0}),
          ("selu", {}), ("celu", {"alpha": 0.7}), ("softsign", {})]


@pytest.mark.parametrize("kind, attrs", TABLES, ids=[k + "".join(f"-{v}" for v in a.values()) for k, a in TABLES])
@pytest.mark.parametrize("qi, qo", [((0.0655, -12), (0.00725, -94)), ((0.031, 7), (0.0211, -3))])
def test_table_op_in_executorch_on_every_code(kind: str, attrs: dict, qi: tuple[float, int],
                                              qo: tuple[float, int], tmp_path: Path) -> None:
    """Each table op alone on all 256 input codes runs inside the XNNPACK delegate (fp32 between convert ops;
    SiLU as sigmoid and mul) and returns the integer reference's table, code for code. ELU, which ExecuTorch
    1.5.1's partitioner leaves out (its config is commented out), runs on the portable kernels in float32 between
    the delegate's dequantize and quantize, with the same codes; the report names it. Mish, Softplus and a
    hardtanh run there too, in float64 (the correctly rounded float32 value: the table by construction)."""
    from calibration.reference import table_lookup

    op = Op(kind, ["x"], ["y"], dict(attrs))
    shape = [1, 16, 16, 1]
    qm = QuantizedModel([op], {"x": _t("x", shape, *qi), "y": _t("y", shape, *qo)}, "x", "y")
    prog = E.lower(qm)
    if kind in E.FLOAT64_PORTABLE:  # decomposed, in float64, every node outside the delegate
        assert E.fp32_inside_delegate(qm) == {}
        outside = prog.delegation["outside_delegate"]
        parts = {"hardtanh": {"aten_clamp_default"}, "selu": {"aten_elu_default"}, "softsign": {"aten_abs_default"},
                 "celu": {"aten_expm1_default"}}.get(kind, {"aten_exp_default", "aten_log1p_default",
                                                            "aten_where_self"})
        assert parts <= set(outside), outside
        assert outside["dim_order_ops__to_dim_order_copy_default"] >= 2  # the casts to float64 and back
        assert prog.delegation["compute_outside_delegate"] == {}  # (mish's mul is its own, in float64)
    elif kind in E.OUTSIDE_DELEGATE:
        assert E.fp32_inside_delegate(qm) == {}
        assert prog.delegation["outside_delegate"] == {f"aten_{kind}_default": 1}
    else:
        assert E.fp32_inside_delegate(qm) == {kind: 1}
        assert prog.delegation["outside_delegate"] == {} and prog.delegation["delegated_subgraphs"] == 1
    path = tmp_path / "m.pte"
    path.write_bytes(prog.data)
    x = np.arange(-128, 128, dtype=np.int8).reshape(1, 16, 16, 1)
    got = E.ExecuTorchRunner(path)(x)
    want = table_lookup(op, x, qi, qo)
    assert np.array_equal(got.reshape(want.shape), want), int((got.reshape(want.shape) != want).sum())


def test_prelu_in_executorch_on_every_code_of_every_channel(tmp_path: Path) -> None:
    """A per-channel PReLU runs inside the XNNPACK delegate (fp32, its slopes a parameter) and returns the integer
    reference's per-channel tables on all 256 codes of each of 4 channels."""
    from calibration.reference import table_lookup

    alpha, qi, qo = [-0.3, 0.0, 0.25, 1.4], (0.05, 3), (0.03, -20)
    op = Op("prelu", ["x"], ["y"], {"alpha": alpha})
    shape = [1, 16, 16, 4]
    qm = QuantizedModel([op], {"x": _t("x", shape, *qi), "y": _t("y", shape, *qo)}, "x", "y")
    prog = E.lower(qm)
    assert E.fp32_inside_delegate(qm) == {"prelu": 1}
    assert prog.delegation["outside_delegate"] == {} and prog.delegation["delegated_subgraphs"] == 1
    path = tmp_path / "m.pte"
    path.write_bytes(prog.data)
    x = np.tile(np.arange(-128, 128, dtype=np.int8).reshape(1, 16, 16, 1), (1, 1, 1, 4))
    got = E.ExecuTorchRunner(path)(x).reshape(1, 4, 16, 16).transpose(0, 2, 3, 1)  # the program's output is NCHW
    want = table_lookup(op, x, qi, qo)
    assert np.array_equal(got, want), int((got != want).sum())


def test_prelu_net_runs_code_for_code_in_one_delegate(tmp_path: Path) -> None:
    """PReluNet: two per-channel PReLUs and a one-slope PReLU (a leaky_relu op), all in one delegate; the runtime's
    logits are the executorch sim's and LiteRT XNNPACK's."""
    from export.tflite import LiteRTRunner, build_tflite

    qm, _ = get("prelunet")
    assert [op.kind for op in qm.ops].count("prelu") == 2
    assert [op.attrs["alpha"] for op in qm.ops if op.kind == "leaky_relu"] == [pytest.approx(0.1)]
    d = program("prelunet").delegation
    assert d["delegated_subgraphs"] == 1 and d["outside_delegate"] == {}
    qm, images, et = _run_et("prelunet", tmp_path)
    assert np.array_equal(et, simulate(qm, images, rounding="executorch"))
    assert np.array_equal(et, LiteRTRunner(build_tflite(qm), "xnnpack")(input_codes(images)))


def test_softmax_net_runs_its_integer_softmax_code_for_code_beside_the_delegate(tmp_path: Path) -> None:
    """SoftmaxNet's F.softmax is the integer softmax on the portable kernels (float64 / int64 steps after the
    delegate's dequantize: no conv or add outside it); the runtime's probabilities are the sim's and LiteRT
    XNNPACK's, code for code; the fp32 twin runs XNNPACK's softmax in its one delegate."""
    from export.tflite import LiteRTRunner, build_tflite

    d = program("softmaxnet").delegation
    assert d["outside_delegate"]["aten_index_tensor"] == 1 and d["outside_delegate"]["aten_amax_default"] == 1
    assert d["compute_outside_delegate"] == {}
    qm, images, et = _run_et("softmaxnet", tmp_path)
    assert qm.ops[-1].kind == "softmax" and qm.output_qparams() == (1 / 256, -128)
    assert np.array_equal(et, simulate(qm, images, rounding="executorch"))
    assert np.array_equal(et, LiteRTRunner(build_tflite(qm), "xnnpack")(input_codes(images)))
    probs = (et.astype(np.int64) + 128).sum(axis=1)
    assert np.all(np.abs(probs - 256) <= 10)  # each row sums to 1 within rounding (10 classes, ±0.5 code each)
    assert E.lower(qm, fp32=True).delegation["outside_delegate"] == {}


def test_executorch_hardswish_table_is_not_tflites() -> None:
    """The fp32 hardswish ExecuTorch runs and TFLite's int16 fixed-point HARD_SWISH differ on some codes (why the
    TFLite writer writes the table instead of HARD_SWISH)."""
    from calibration.reference import table_lookup, tflite_hardswish
    from calibration.sim import et_hardswish_table

    q = np.arange(-128, 128).astype(np.int8)
    et, tfl = et_hardswish_table((0.05, 0), (0.02, -100)), tflite_hardswish(q, (0.05, 0), (0.02, -100))
    assert np.array_equal(table_lookup(Op("hardswish", ["x"], ["y"]), q, (0.05, 0), (0.02, -100)), et)
    assert 0 < int((et != tfl).sum()) <= 16 and int(np.abs(et.astype(int) - tfl).max()) == 1


def test_executorch_rounding_is_xnnpack_without_fp32_ops() -> None:
    qm, images = get("tiny-mbv2")
    assert not {op.kind for op in qm.ops} & {"hardswish", "avg_pool2d"}
    assert np.array_equal(simulate(qm, images, rounding="executorch"), simulate(qm, images, rounding="xnnpack"))


@pytest.mark.slow  # one more lowering; the command test already writes and runs the fp32 twin
def test_fp32_twin_computes_the_same_function(tmp_path: Path) -> None:
    qm, images = get("tiny-mbv2")
    prog = E.lower(qm, fp32=True)
    assert prog.delegation["outside_delegate"] == {} and prog.delegation["delegated_subgraphs"] == 1
    path = tmp_path / "m_fp32.pte"
    path.write_bytes(prog.data)
    t = qm.tensors[qm.input]
    out = E.ExecuTorchRunner(path, fp32_input=t.qparams)(input_codes(images))
    assert out.dtype == np.float32
    scale, zp = qm.output_qparams()
    sim = (simulate(qm, images).astype(np.float32) - zp) * scale
    assert np.abs(out - sim).max() < 0.25 * np.abs(sim).max()  # same function up to activation rounding


# ----------------------------------------------------------------------------------------------------
# What the writer refuses, before writing


def _refused(qm: QuantizedModel, tmp_path: Path, match: str) -> None:
    with pytest.raises(UserError, match=match):
        E.write_pte(qm, tmp_path / "m_xnnpack.pte")
    assert list(tmp_path.iterdir()) == []


def test_refuses_4bit_activations(tmp_path: Path) -> None:
    qm = copy.deepcopy(get("poolnet")[0])
    qm.tensors[qm.ops[1].outputs[0]].bits = 4
    _refused(qm, tmp_path, "8-bit per-tensor activations")


def test_refuses_conv_groups_that_do_not_divide(tmp_path: Path) -> None:
    qm = copy.deepcopy(get("poolnet")[0])
    op = next(op for op in qm.ops if op.kind == "conv2d" and qm.tensors[op.inputs[1]].data.shape[1] == 8)
    t = qm.tensors[op.inputs[1]]
    t.data, t.shape = t.data[:, :3].copy(), [16, 3, 3, 3]  # 3 input channels per group of an 8-channel input
    _refused(qm, tmp_path, r"groups \(= 8 / 3\) must divide both")


def test_killed_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ghnq.fileio

    def killed(*_a: object) -> None:
        raise KeyboardInterrupt  # the process dies between writing the temp file and the rename

    prog = program("poolnet")  # before the patch: program() itself calls E.lower (a cache miss would recurse)
    monkeypatch.setattr(E, "lower", lambda qm, fp32=False: prog)
    monkeypatch.setattr(ghnq.fileio.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        E.write_pte(get("poolnet")[0], tmp_path / "m_xnnpack.pte")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------
# The command


def _cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        run_cli(E.main, argv)
    return int(e.value.code or 0), capsys.readouterr().err


def test_command_writes_verified_artifacts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "o"
    # predicted (near-chance) weights: loose tolerance (untrained layers amplify rounding differences)
    code, err = _cli(["--arch", str(ROOT / "specs/tiny-mbv2.yaml"), "--out", str(out), "--calib-images", "32",
                      "--verify-images", "24", "--max-step-error", "100", "--min-agreement", "0", "--quiet"], capsys)
    assert code == 0, err
    r = json.loads((out / "report.json").read_text())
    for key in ("artifact", "images", "top1_agreement", "max_step_error", "p99_step_error", "accuracy_artifact",
                "accuracy_sim", "accuracy_float", "weights", "reference", "logits_within_1_step"):
        assert key in r, key
    assert Path(r["artifact"]) == out / "tiny-mbv2_xnnpack.pte" and r["images"] == 24 and r["passed"]
    assert r["format"] == "executorch" and r["runtime"].startswith("ExecuTorch")
    assert r["writer"]["delegation"]["compute_outside_delegate"] == {}
    # held to the sim with ExecuTorch's arithmetic; the fp32 ops inside the delegate are counted and reported
    assert r["arithmetic"] == "executorch" and "vs_xnnpack_sim" in r and "vs_tflite_sim" in r
    fp32_ops = r["writer"]["delegation"]["fp32_inside_delegate"]
    assert fp32_ops == E.fp32_inside_delegate(load_qm(out / "tiny-mbv2.qm")) and set(fp32_ops) <= {"pad"}, fp32_ops
    md = (out / "report.md").read_text()
    assert "executorch arithmetic" in md and (not fp32_ops or "fp32 inside the delegate: pad ×" in md)
    assert (out / "tiny-mbv2_fp32.pte").is_file() and (out / "report.md").is_file()
    assert r["float_artifacts"][0]["accuracy"] is not None
    x = np.load(out / "verify" / "inputs_int8.npy")
    assert x.dtype == np.int8 and x.shape == (24, 32, 32, 3)
    assert r["weights"].startswith("GHN-Q prediction (ghnq.pt")  # the shipped checkpoint is the default


@pytest.mark.parametrize("fmt", ["tflite", "executorch"])
def test_declared_input_size_is_the_artifacts(fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A spec declaring a non-square, non-CIFAR input: the images are resized for calibration and verification,
    the artifact takes exactly that input, and its runtime equals the sim (default tolerance)."""
    from export import tflite as T

    spec = tmp_path / "rect.yaml"
    spec.write_text("name: rect\ninput: [3, 40, 24]\nnum_classes: 12\nstem: {out: 8, stride: 2}\nstages: "
                    "[{block: mbconv, out: 16, stride: 2, se: true}, {block: bottleneck, out: 24, stride: 2}]\n")
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        run_cli((T if fmt == "tflite" else E).main, ["--arch", str(spec), "--out", str(out), "--calib-images", "32",
                                                     "--verify-images", "16", "--reference-images", "16", "--quiet"])
    assert e.value.code in (0, None), capsys.readouterr().err
    r = json.loads((out / "report.json").read_text())
    assert r["passed"] and r["max_step_error"] <= 1, r.get("failures")
    qm = load_qm(out / "rect.qm")
    assert list(qm.tensors[qm.input].shape) == [1, 40, 24, 3] and list(qm.tensors[qm.output].shape) == [1, 12]
    assert np.load(out / "verify" / "inputs_int8.npy").shape == (16, 40, 24, 3)
    if fmt == "tflite":  # the file's own signature, read by the real interpreter
        from ai_edge_litert.interpreter import Interpreter

        interp = Interpreter(str(out / "rect_int8.tflite"))
        assert list(interp.get_input_details()[0]["shape"]) == [1, 40, 24, 3]
        assert r["exact"][0]["differing_codes"] == 0 and r["exact"][0]["codes"] == 16 * 12


@pytest.mark.parametrize("args, match", [
    (["--arch", "specs/nope.yaml"], "nope.yaml"),
    (["--arch", "{spec_bad}"], "stem"),
    (["--arch", "specs/tiny-mbv2.yaml", "--weights", "missing.pt"], "missing.pt"),
    (["--arch", "specs/tiny-mbv2.yaml", "--bits", "3"], "--bits"),
    (["--arch", "specs/tiny-mbv2.yaml", "--calib-images", "8", "--verify-images", "4", "--per-layer"],
     "--per-layer"),
])
def test_bad_input_exits_2_and_writes_nothing(args: list[str], match: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nstem: {out: -3}\nstages: []\n")
    args = [a.replace("{spec_bad}", str(bad)) for a in args]
    code, err = _cli([*args, "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert code == 2 and match in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_unsupported_model_exits_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(qm: QuantizedModel) -> None:
        raise UserError("op 3 (gelu): no ExecuTorch/XNNPACK mapping")  # what check_supported says

    monkeypatch.setattr(E, "check_supported", refuse)
    code, err = _cli(["--arch", str(ROOT / "specs/tiny-mbv2.yaml"), "--out", str(tmp_path / "o"),
                      "--calib-images", "8", "--verify-images", "4", "--quiet"], capsys)
    assert code == 2 and "no ExecuTorch/XNNPACK mapping" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("module", ["export.executorch", "export.tflite"])
def test_bad_input_is_one_line_from_a_fresh_process(module: str, tmp_path: Path) -> None:
    """What a user sees on bad input, imports included: exactly the one error line (the pinned torchao / torch
    print import-time warnings that the packages silence)."""
    gray = tmp_path / "gray.yaml"
    gray.write_text("name: gray\ninput: [1, 28, 28]\nstages: [{block: basic, out: 8}]\n")
    r = subprocess.run([sys.executable, "-m", module, "--arch", str(gray), "--out", str(tmp_path / "o"), "--quiet"],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and r.stdout == "", r.stdout
    assert r.stderr.splitlines() == [f"error: {gray}: input: 1 channel(s); the calibration and test data are RGB "
                                     "CIFAR-10 images, so allowed here: 3"], r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("module", ["export.executorch", "export.tflite"])
def test_quiet_export_prints_only_its_result(module: str, tmp_path: Path) -> None:
    """`--quiet` from a fresh process: the result line and the report path, nothing else — the runtimes' C++
    start-up chatter on fd 2 (LiteRT's delegate banner, ExecuTorch's cpuinfo probing) is dropped."""
    spec = tmp_path / "q.yaml"
    spec.write_text("name: q\ninput: [3, 16, 16]\nstem: {out: 8}\nstages: [{block: sep, out: 16, stride: 2}]\n")
    r = subprocess.run([sys.executable, "-m", module, "--arch", str(spec), "--out", str(tmp_path / "o"), "--quiet",
                        "--calib-images", "16", "--verify-images", "8", "--reference-images", "4"],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = (r.stdout + r.stderr).splitlines()
    assert len(lines) == 2 and lines[0].startswith("q: ") and "verified" in lines[0], lines
    assert lines[1].startswith("report: "), lines


def test_native_log_filter_passes_other_lines_on(capfd: pytest.CaptureFixture) -> None:
    """Only the matching lines written to fd 2 are dropped; everything else reaches stderr in order."""
    from ghnq.cli import drop_native_log_lines

    with drop_native_log_lines(r"\[noise\.cpp:\d+\] "):
        os.write(2, b"[noise.cpp:12] probing\nERROR: a real problem\n[noise.cpp:99] more\nlast, unterminated")
    os.write(2, b"\n[noise.cpp:1] after the block\n")
    assert capfd.readouterr().err == "ERROR: a real problem\nlast, unterminated\n[noise.cpp:1] after the block\n"


@pytest.mark.parametrize("fmt", ["tflite", "executorch"])
def test_qm_file_is_exported_as_it_is(fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--qm`: a .qm from `python -m calibration` (4-bit weights, a non-square input) is written and verified with
    exactly its parameters — no weights, no calibration; calibration flags are refused with it."""
    from calibration.__main__ import main as calibrate_main
    from export import tflite as T

    spec = tmp_path / "k.yaml"
    spec.write_text("name: k\ninput: [3, 24, 40]\nstem: {out: 8, stride: 2}\n"
                    "stages: [{block: mbconv, out: 16, stride: 2, se: true, act: hardswish}]\n")
    qm_file = tmp_path / "k4.qm"
    assert calibrate_main(["--arch", str(spec), "--bits", "4", "--images", "32", "--eval-images", "0",
                           "-o", str(qm_file)]) in (0, None)
    module = T if fmt == "tflite" else E
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        run_cli(module.main, ["--qm", str(qm_file), "--out", str(out), "--verify-images", "16",
                              "--reference-images", "16", "--quiet"])
    assert e.value.code in (0, None), capsys.readouterr().err
    capsys.readouterr()
    r = json.loads((out / "report.json").read_text())
    assert r["passed"] and r["images"] == 16 and r["spec"] == str(qm_file)
    assert r["calibration"]["weight_bits"] == 4 and r["calibration"]["from"] == str(qm_file)
    assert r["accuracy_float"] is None  # a .qm carries no float weights
    a, b = load_qm(qm_file), load_qm(out / "k.qm")
    assert a.ops == b.ops and set(a.tensors) == set(b.tensors)
    for k, t in a.tensors.items():
        u = b.tensors[k]
        assert np.array_equal(t.scale, u.scale) and np.array_equal(t.zero_point, u.zero_point), k
        assert (t.data is None and u.data is None) or np.array_equal(t.data, u.data), k
    assert np.load(out / "verify" / "inputs_int8.npy").shape == (16, 24, 40, 3)
    for flags in (["--bits", "8"], ["--weights", str(qm_file)], ["--calib-images", "8"], ["--no-bn-recalibrate"]):
        code, err = _cli(["--qm", str(qm_file), "--out", str(tmp_path / "o2"), "--quiet", *flags], capsys)
        flag = flags[0].replace("--no-", "--")
        assert code == 2 and err.startswith(f"error: {flag}: not used with --qm"), err
    assert not (tmp_path / "o2").exists()



@pytest.mark.parametrize("fmt", ["tflite", "executorch"])
def test_qm_xnnpack_cannot_load_is_refused_and_nothing_written(fmt: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A QM with a requantization scale ≥ 256 (an SE gate's output range far narrower than its input's, as BN
    statistics that do not fit the weights make): refused up front naming the op; and were the check missing,
    the runtime's own refusal is one line too — neither leaves a file."""
    from calibration.qmodel import save as save_qm
    from export import tflite as T

    spec = tmp_path / "k.yaml"
    spec.write_text("name: k\ninput: [3, 16, 16]\nstem: {out: 8}\nstages: [{block: mbconv, out: 8, se: true}]\n")
    model = build_model(load_spec(spec))
    calib, _, _ = load_eval_images(16, split="train", quiet=True)
    qm = calibrate(model, calib[:, :16, :16], progress=False, meta={"name": "k"})
    gate = next(i for i, op in enumerate(qm.ops) if op.attrs.get("fused") == "relu_0_to_1")
    src, w, dst = (qm.tensors[n] for n in (*qm.ops[gate].inputs[:2], qm.ops[gate].outputs[0]))
    src.scale = np.float32(1000 * dst.scale[0] / w.scale.max()) * np.ones_like(src.scale)  # gate input range blown up
    assert float(src.scale[0] * w.scale.max() / dst.scale[0]) > 256
    qm.tensors[qm.ops[gate].inputs[2]].scale = np.float32(src.scale[0]) * w.scale.astype(np.float32)  # consistent
    bad = save_qm(qm, tmp_path / "bad.qm")
    module = T if fmt == "tflite" else E
    argv = ["--qm", str(bad), "--out", str(tmp_path / "o"), "--verify-images", "8", "--reference-images", "4",
            "--quiet"]
    with pytest.raises(SystemExit) as e:
        run_cli(module.main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"op {gate} (conv2d" in err and "requantization scale" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    monkeypatch.setattr(module, "check_requantization", lambda qm: None)
    with pytest.raises(SystemExit) as e:
        run_cli(module.main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "refused the artifact" in err and "nothing was written" in err, err
    assert not list((tmp_path / "o").glob("*.tflite")) and not list((tmp_path / "o").glob("*.pte"))
