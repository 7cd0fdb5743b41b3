"""export.tflite: the int8 file carries the QuantizedModel's exact parameters and runs its exact arithmetic.

* every scale / zero point / int8 weight / int32 bias read back from the file equals the QM's bit for bit;
* int8 input and output, no float tensor, no QUANTIZE/DEQUANTIZE inside;
* LiteRT's reference kernels (BUILTIN_REF) equal calibration's integer reference on every tensor (0 codes);
* the default XNNPACK delegate, run op by op on the reference's inputs, stays within 1 step of it;
* int8 hardswish is the integer reference's table (CAST → ADD → GATHER): every runner computes it exactly on all
  256 codes;
* the command writes atomically, and bad input exits 2 with nothing written.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from calibration import calibrate, reference
from calibration.qmodel import INPUT_SCALE, Op, QuantizedModel, Tensor
from calibration.sim import input_codes, run_ops, simulate
from export import tflite as T
from ghnq.cli import UserError, run_cli
from ghnq.data import load_eval_images
from ghnq.spec import build_model, load_spec
from tests.nets import USER_NETS

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted(p.stem for p in (ROOT / "specs").glob("*.yaml"))
N_IMAGES = 16


# ----------------------------------------------------------------------------------------------------
# Models under test: a hand-built QM with every op kind, and each spec calibrated on real images


def hand_qm(seed: int = 0) -> tuple[QuantizedModel, np.ndarray]:
    """Every op kind the writer maps, incl. a PAD-needing stride-2 conv, SAME pools, the SE pattern,
    an explicit pad and a reshape; ranges observed from a float run of the same ops on random pixels."""
    rng = np.random.default_rng(seed)
    conv = {"dilation": [1, 1], "stride": [1, 1], "padding": [0, 0, 0, 0]}
    ops = [
        Op("conv2d", ["x", "c1.w", "c1.b"], ["c1"], {**conv, "stride": [2, 2], "padding": [1, 1, 1, 1],
                                                     "fused": "relu6"}),
        Op("depthwise_conv2d", ["c1", "dw.w", "dw.b"], ["dw"], {**conv, "padding": [1, 1, 1, 1], "fused": "relu",
                                                               "depth_multiplier": 1}),
        Op("add", ["c1", "dw"], ["add"], {"fused": "none"}),
        Op("hardswish", ["add"], ["hs"]),
        Op("max_pool2d", ["hs"], ["mp"], {"kernel": [2, 2], "stride": [1, 1], "padding": [0, 0, 0, 0]}),
        Op("avg_pool2d", ["mp"], ["ap"], {"kernel": [3, 3], "stride": [1, 1], "padding": [1, 1, 1, 1]}),
        Op("mean", ["ap"], ["se.in"], {"keepdims": True}),
        Op("conv2d", ["se.in", "se1.w", "se1.b"], ["se1"], {**conv, "fused": "relu"}),
        Op("conv2d", ["se1", "se2.w", "se2.b"], ["se2"], {**conv, "fused": "relu_0_to_1"}),
        Op("mul", ["ap", "se2"], ["mul"], {"fused": "none"}),
        Op("pad", ["mul"], ["pad"], {"padding": [0, 1, 1, 0]}),
        Op("mean", ["pad"], ["gap"], {"keepdims": True}),
        Op("reshape", ["gap"], ["flat"], {"shape": [1, 8]}),
        Op("fully_connected", ["flat", "fc.w", "fc.b"], ["logits"], {"fused": "none"}),
    ]
    shapes = {"x": [1, 9, 9, 3], "c1": [1, 5, 5, 8], "dw": [1, 5, 5, 8], "add": [1, 5, 5, 8], "hs": [1, 5, 5, 8],
              "mp": [1, 4, 4, 8], "ap": [1, 4, 4, 8], "se.in": [1, 1, 1, 8], "se1": [1, 1, 1, 4],
              "se2": [1, 1, 1, 8], "mul": [1, 4, 4, 8], "pad": [1, 5, 5, 8], "gap": [1, 1, 1, 8], "flat": [1, 8],
              "logits": [1, 5]}
    wshapes = {"c1": [8, 3, 3, 3], "dw": [8, 1, 3, 3], "se1": [4, 8, 1, 1], "se2": [8, 4, 1, 1], "fc": [5, 8]}
    fw = {f"{k}.w": torch.tensor(rng.normal(0, 0.5, s), dtype=torch.float32) for k, s in wshapes.items()}
    fb = {f"{k}.b": torch.tensor(rng.normal(0, 0.3, s[0]), dtype=torch.float32) for k, s in wshapes.items()}
    images = rng.integers(0, 256, (N_IMAGES, 9, 9, 3), dtype=np.uint8)
    env = run_ops(ops, "x", torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2) / 255, {**fw, **fb})
    tensors = {"x": Tensor("x", shapes["x"], "int8", np.array([INPUT_SCALE], np.float32), np.array([-128]))}
    shared = {"mp": "hs", "ap": "hs", "pad": "mul", "flat": "gap"}  # TFLite: these outputs share their input's
    for op in ops:
        y = op.outputs[0]
        if y in shared:
            src = tensors[shared[y]]
            tensors[y] = Tensor(y, shapes[y], "int8", src.scale.copy(), src.zero_point.copy())
        elif op.attrs.get("fused") == "relu_0_to_1":
            tensors[y] = Tensor(y, shapes[y], "int8", np.array([INPUT_SCALE], np.float32), np.array([-128]))
        else:
            lo, hi = min(float(env[y].min()), 0.0), max(float(env[y].max()), 0.0)
            s = np.float32((hi - lo) / 255)
            zp = int(np.clip(round(-128 - lo / float(s)), -128, 127))
            tensors[y] = Tensor(y, shapes[y], "int8", np.array([s], np.float32), np.array([zp]))
        if op.kind in ("conv2d", "depthwise_conv2d", "fully_connected"):
            w, b = fw[op.inputs[1]].numpy(), fb[op.inputs[2]].numpy()
            sw = (np.abs(w).reshape(len(w), -1).max(1) / 127).astype(np.float32)
            qw = np.clip(np.round(w / sw.reshape(-1, *[1] * (w.ndim - 1))), -127, 127).astype(np.int8)
            sb = (np.float32(tensors[op.inputs[0]].scale[0]) * sw).astype(np.float32)
            zeros = np.zeros(len(sw), np.int64)
            tensors[op.inputs[1]] = Tensor(op.inputs[1], list(w.shape), "int8", sw, zeros, 0, data=qw)
            tensors[op.inputs[2]] = Tensor(op.inputs[2], [len(b)], "int32", sb, zeros, 0, 32,
                                           np.round(b / sb).astype(np.int32))
    qm = QuantizedModel(ops, tensors, "x", "logits", {"name": "hand"})
    qm.validate()
    return qm, images


@cache
def spec_qm(name: str) -> tuple[QuantizedModel, np.ndarray]:
    """A spec with seeded random weights, BN re-estimated and calibrated on real CIFAR-10 images."""
    model = build_model(load_spec(ROOT / "specs" / f"{name}.yaml"))
    _random_init(model)
    images, _, _ = load_eval_images(48, quiet=True)
    qm = calibrate(model, images[:32], bn_recalibrate=True, progress=False, meta={"name": name})
    return qm, images[32:32 + N_IMAGES]


def _random_init(model: torch.nn.Module) -> None:
    torch.manual_seed(0)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


def net_qm(name: str) -> tuple[QuantizedModel, np.ndarray]:
    """A user-style nn.Module of tests/nets.py, seeded random weights, calibrated like the specs."""
    model = USER_NETS[name]()
    _random_init(model)
    images, _, _ = load_eval_images(48, quiet=True)
    qm = calibrate(model, images[:32], bn_recalibrate=True, progress=False, meta={"name": name})
    return qm, images[32:32 + N_IMAGES]


def models() -> list:
    return [pytest.param(s, id=s) for s in ("hand", *USER_NETS, *SPECS)]


def get(name: str) -> tuple[QuantizedModel, np.ndarray]:
    if name in USER_NETS:
        return net_qm(name)
    return hand_qm() if name == "hand" else spec_qm(name)


# ----------------------------------------------------------------------------------------------------
# The file carries the QM's numbers


OP_NAMES = {v: k for k, v in vars(T.tfl.BuiltinOperator).items() if not k.startswith("_")}


def _read_back(data: bytes) -> tuple[T.tfl.ModelT, dict[str, T.tfl.TensorT]]:
    model = T.tfl.ModelT.InitFromPackedBuf(data, 0)
    return model, {t.name.decode(): t for t in model.subgraphs[0].tensors}


@pytest.mark.parametrize("name", models())
def test_parameters_bit_exact(name: str) -> None:
    qm, _ = get(name)
    data = T.build_tflite(qm)
    model, tensors = _read_back(data)
    assert bytes(data[4:8]) == b"TFL3" and model.version == 3
    assert model.buffers[0].data is None  # the empty sentinel
    folded = T.fold_mean_reshape(qm, qm.ops)
    for n, t in qm.tensors.items():
        if n in folded:
            assert folded[n] in tensors and n not in tensors
            continue
        ft = tensors[n]
        q = ft.quantization
        assert q.scale.dtype == np.float32 and q.scale.tobytes() == t.scale.astype(np.float32).tobytes(), n
        assert np.array_equal(q.zeroPoint, t.zero_point), n
        if not t.is_const:
            assert ft.type == T.tfl.TensorType.INT8 and ft.buffer == 0, n
            continue
        raw = np.frombuffer(model.buffers[ft.buffer].data.tobytes(), dtype=t.dtype).reshape(ft.shape)
        producer = next(op for op in qm.ops if n in op.inputs)
        if t.dtype == "int32":
            expect, qdim = t.data, 0
        elif producer.kind == "conv2d":
            expect, qdim = t.data.transpose(0, 2, 3, 1), 0
        elif producer.kind == "depthwise_conv2d":
            expect, qdim = t.data.transpose(1, 2, 3, 0), 3
        else:
            expect, qdim = t.data, 0
        assert raw.tobytes() == np.ascontiguousarray(expect).tobytes(), n
        assert q.quantizedDimension == qdim, n
    # the same through the interpreter (what a runtime sees)
    it = T.LiteRTRunner(data, "ref").interp
    details = {d["name"]: d for d in it.get_tensor_details()}
    for n, t in qm.tensors.items():
        if n in folded:
            continue
        qp = details[n]["quantization_parameters"]
        assert np.array_equal(qp["scales"], t.scale) and np.array_equal(qp["zero_points"], t.zero_point), n
    # integer only: int8 I/O, no float tensor, no (de)quantize
    assert it.get_input_details()[0]["dtype"] == np.int8 and it.get_output_details()[0]["dtype"] == np.int8
    # (the model's tensors: SUM and REDUCE_MAX add unnamed scratch tensors of their own, an int64 accumulator)
    assert all(d["dtype"] in (np.int8, np.int32) for n, d in details.items() if n)
    sg = model.subgraphs[0]
    used = {OP_NAMES[model.operatorCodes[op.opcodeIndex].builtinCode] for op in sg.operators}
    assert not used & {"QUANTIZE", "DEQUANTIZE", "TRANSPOSE", "HARD_SWISH"}
    for op in sg.operators:  # both opcode fields, the converter's versions; int32 only in the table ops' index
        oc = model.operatorCodes[op.opcodeIndex]  # and the integer softmax
        n = OP_NAMES[oc.builtinCode]
        assert oc.deprecatedBuiltinCode == min(oc.builtinCode, 127)
        int32 = sg.tensors[op.outputs[0]].type == T.tfl.TensorType.INT32
        assert oc.version == (T.INT32_VERSIONS if int32 and n != "CAST" else T.INT8_VERSIONS)[n], n
        assert not int32 or n in ("CAST", "ADD") or qm.ops[-1].kind == "softmax", n


# ----------------------------------------------------------------------------------------------------
# The file computes the integer reference's codes


@pytest.mark.parametrize("name", models())
def test_reference_kernels_equal_integer_reference_on_every_tensor(name: str) -> None:
    qm, images = get(name)
    runner = T.LiteRTRunner(T.build_tflite(qm), "ref", preserve_all=True)
    got = runner.tensors(input_codes(images))
    logits, want = reference.run(qm, images, capture=True)
    folded = T.fold_mean_reshape(qm, qm.ops)  # global-pool outputs written straight into the flatten's tensor
    activations = [qm.input] + [op.outputs[0] for op in qm.ops if op.outputs[0] not in folded]
    assert len(activations) == len(qm.ops) + 1 - len(folded)
    for n in activations:
        assert n in got, n
        diff = int((got[n].reshape(want[n].shape) != want[n]).sum())
        assert diff == 0, f"{name}: tensor {n!r}: {diff} of {want[n].size} codes differ from the integer reference"
    assert np.array_equal(runner(input_codes(images)), logits)


@pytest.mark.parametrize("name", models())
def test_xnnpack_within_one_step_per_op(name: str) -> None:
    """Each op alone under the XNNPACK delegate, fed the reference's input codes: ≤ 1 step from it.

    (Per op, because end to end a 1-step difference can grow through random-weight layers; the export
    report measures the end-to-end error on real weights.)"""
    qm, images = get(name)
    _, env = reference.run(qm, images, capture=True)
    worst = {}
    for op in qm.ops:
        got = T.LiteRTRunner(T.build_tflite(qm, ops=[op]), "xnnpack").run_named(env)
        d = np.abs(got.astype(np.int32) - env[op.outputs[0]].reshape(got.shape))
        worst[f"{op.kind} {op.outputs[0]}"] = int(d.max())
    assert max(worst.values()) <= 1, {k: v for k, v in worst.items() if v > 1}


TABLES = [("hardswish", {}), ("sigmoid", {}), ("silu", {}), ("tanh", {}), ("leaky_relu", {"alpha": 0.1}),
          ("gelu", {}), ("elu", {"alpha": 1.0}), ("elu", {"alpha": 0.4}),
          ("mish", {}), ("softplus", {"beta": 1.0, "threshold": 20.0}), ("softplus", {"beta": 2.0, "threshold": 3.0}),
          ("hardtanh", {"min": -0.5, "max": 1.25}), ("hardtanh", {"min": None, "max": 2.0}),
          ("selu", {}), ("celu", {"alpha": 0.7}), ("softsign", {})]


@pytest.mark.parametrize("kind, attrs", TABLES, ids=[k + "".join(f"-{v}" for v in a.values()) for k, a in TABLES])
@pytest.mark.parametrize("qi, qo", [((0.0655, -12), (0.00725, -94)), ((0.05, 0), (0.02, -100)),
                                     ((0.11, 30), (0.06, -128))])
def test_table_op_on_every_code(kind: str, attrs: dict, qi: tuple[float, int], qo: tuple[float, int]) -> None:
    """A table op alone on all 256 input codes: LiteRT's reference kernels, its optimized kernels and the
    default XNNPACK path compute the integer reference's table exactly, with integer-only ops (no float tensor)."""
    t = {n: Tensor(n, [1, 16, 16, 1], "int8", np.array([s], np.float32), np.array([zp]))
         for n, (s, zp) in (("x", qi), ("y", qo))}
    op = Op(kind, ["x"], ["y"], dict(attrs))
    qm = QuantizedModel([op], t, "x", "y")
    x = np.arange(-128, 128, dtype=np.int8).reshape(1, 16, 16, 1)
    want = reference.table_lookup(op, x, qi, qo)
    assert np.array_equal(want.ravel(), reference.table_for(kind, qi, qo, **attrs))
    assert len(np.unique(want)) > 10  # a real function of the input, not a constant
    data = T.build_tflite(qm)
    assert T.op_histogram(data) == {"CAST": 1, "ADD": 1, "GATHER": 1}
    for kernels in T.KERNELS:
        got = T.LiteRTRunner(data, kernels).run_named({"x": x})
        assert got.dtype == np.int8 and np.array_equal(got.reshape(want.shape), want), kernels
    details = T.LiteRTRunner(data, "ref").interp.get_tensor_details()
    assert {np.dtype(d["dtype"]).name for d in details} == {"int8", "int32"}


def test_prelu_is_one_table_per_channel_on_every_code() -> None:
    """A per-channel PReLU (4 slopes: negative, zero, small, above one) on all 256 codes of each channel: the
    .tflite's GATHER reads table row c for channel c (CAST → ADD of 128 + 256·c → GATHER), and every LiteRT kernel
    set returns the integer reference's codes; row c is LeakyReLU's table with slope c; the fp32 twin is PRELU."""
    from calibration.sim import table_function

    alpha, qi, qo = [-0.3, 0.0, 0.25, 1.4], (0.05, 3), (0.03, -20)
    t = {n: Tensor(n, [1, 16, 16, 4], "int8", np.array([s], np.float32), np.array([zp]))
         for n, (s, zp) in (("x", qi), ("y", qo))}
    op = Op("prelu", ["x"], ["y"], {"alpha": alpha})
    qm = QuantizedModel([op], t, "x", "y")
    x = np.tile(np.arange(-128, 128, dtype=np.int8).reshape(1, 16, 16, 1), (1, 1, 1, 4))
    want = reference.table_lookup(op, x, qi, qo)
    for c, a in enumerate(alpha):
        assert np.array_equal(want[..., c].ravel(), reference.table_for("leaky_relu", qi, qo, alpha=a))
    assert len({want[..., c].tobytes() for c in range(4)}) == 4
    data = T.build_tflite(qm)
    assert T.op_histogram(data) == {"CAST": 1, "ADD": 1, "GATHER": 1}
    for kernels in T.KERNELS:
        got = T.LiteRTRunner(data, kernels).run_named({"x": x})
        assert np.array_equal(got.reshape(want.shape), want), kernels
    twin = T.build_tflite(qm, fp32=True)
    assert T.op_histogram(twin) == {"PRELU": 1}
    xf = np.linspace(-6, 6, 1024, dtype=np.float32).reshape(1, 16, 16, 4)
    got = T.LiteRTRunner(twin, "ref").run_named({"x": xf})
    ref = table_function("prelu", {"alpha": alpha})(torch.from_numpy(xf).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert np.allclose(got.reshape(xf.shape), ref.numpy(), atol=1e-6)


@pytest.mark.parametrize("kind, attrs", TABLES, ids=[k + "".join(f"-{v}" for v in a.values()) for k, a in TABLES])
def test_table_op_fp32_twin_is_the_float_function(kind: str, attrs: dict) -> None:
    """The fp32 twin writes TFLite's float builtins (SiLU as x · LOGISTIC(x)); they compute torch's function."""
    from calibration.sim import table_function

    t = {n: Tensor(n, [1, 16, 16, 1], "int8", np.array([0.05], np.float32), np.array([0])) for n in ("x", "y")}
    qm = QuantizedModel([Op(kind, ["x"], ["y"], dict(attrs))], t, "x", "y")
    data = T.build_tflite(qm, fp32=True)
    x = np.linspace(-6, 6, 256, dtype=np.float32).reshape(1, 16, 16, 1)
    got = T.LiteRTRunner(data, "ref").run_named({"x": x})
    want = table_function(kind, attrs)(torch.from_numpy(x)).numpy()
    assert np.allclose(got.reshape(want.shape), want, atol=1e-5)


def test_hardswish_table_is_not_tflites_hard_swish() -> None:
    """Why the writer does not use HARD_SWISH: TFLite's int16 fixed-point kernel differs from the table."""
    q = np.arange(-128, 128).astype(np.int8)
    table = reference.table_lookup(Op("hardswish", ["x"], ["y"]), q, (0.05, 0), (0.02, -100))
    diff = table != reference.tflite_hardswish(q, (0.05, 0), (0.02, -100))
    assert int(diff.sum()) > 0


def test_xnnpack_end_to_end_hand_model() -> None:
    qm, images = hand_qm()
    out = T.LiteRTRunner(T.build_tflite(qm), "xnnpack")(input_codes(images))
    ref = reference.run(qm, images)
    assert np.abs(out.astype(np.int32) - ref).max() <= 1
    assert np.array_equal(out.argmax(1), ref.argmax(1))


def test_max_pool_padding_beyond_same_pads_with_the_lowest_code() -> None:
    """torchpoolnet's ceil-mode max pool on a 16×16 map (padding [1, 2, 1, 2], after a conv with no ReLU) is not
    TFLite SAME: the .tflite pads with PADV2 (code -128, which changes no max) and pools VALID; LiteRT's default
    XNNPACK path equals the sim with XNNPACK's arithmetic code for code, and the fp32 twin pads the same way."""
    qm, images = net_qm("torchpoolnet")
    ops = T.op_histogram(T.build_tflite(qm))
    assert ops["PADV2"] == 1 and ops["PAD"] == 1 and ops["MAX_POOL_2D"] == 3  # PAD: the avg pool's zeros
    out = T.LiteRTRunner(T.build_tflite(qm), "xnnpack")(input_codes(images))
    assert np.array_equal(out, simulate(qm, images, rounding="xnnpack"))
    assert T.op_histogram(T.build_tflite(qm, fp32=True))["PADV2"] == 1


def test_fp32_twin_is_the_same_graph_in_float() -> None:
    qm, images = spec_qm("tiny-mbv2")
    data = T.build_tflite(qm, fp32=True)
    model, tensors = _read_back(data)
    assert all(t.type == T.tfl.TensorType.FLOAT32 for n, t in tensors.items() if not n.endswith(("/paddings", "/axes",
                                                                                                  "/shape")))
    ops8, ops32 = T.op_histogram(T.build_tflite(qm)), T.op_histogram(data)
    extra = ops32.pop("RELU_0_TO_1", 0)  # the SE gate's clamp (int8 does it by saturation)
    assert ops32 == ops8 and extra == sum(op.attrs.get("fused") == "relu_0_to_1" for op in qm.ops)
    t = qm.tensors[qm.input]
    x = (input_codes(images).astype(np.float32) - t.zero_point[0]) * t.scale[0]
    out = T.LiteRTRunner(data, "xnnpack")(x.astype(np.float32))
    scale, zp = qm.output_qparams()
    sim = (simulate(qm, images).astype(np.float32) - zp) * scale
    assert np.abs(out - sim).max() < 0.25 * np.abs(sim).max()  # same function up to activation rounding


# ----------------------------------------------------------------------------------------------------
# What the writer refuses, before writing


def _refused(qm: QuantizedModel, tmp_path: Path, match: str) -> None:
    path = tmp_path / "m_int8.tflite"
    with pytest.raises(UserError, match=match):
        T.write_tflite(qm, path)
    assert list(tmp_path.iterdir()) == []


def test_refuses_4bit_activations(tmp_path: Path) -> None:
    qm, _ = hand_qm()
    qm.tensors["hs"].bits = 4
    _refused(qm, tmp_path, "8-bit per-tensor activations")


def test_refuses_conv_groups_that_do_not_divide(tmp_path: Path) -> None:
    qm, _ = hand_qm()
    t = qm.tensors["se2.w"]
    t.data, t.shape = t.data[:, :3], [8, 3, 1, 1]  # 3 input channels per group of a 4-channel input
    _refused(qm, tmp_path, r"groups \(= 4 / 3\) must divide both")


def test_refuses_unmappable_avg_pool_padding(tmp_path: Path) -> None:
    qm, _ = hand_qm()
    op = next(op for op in qm.ops if op.kind == "avg_pool2d")
    op.attrs["padding"] = [2, 0, 2, 0]  # neither SAME nor VALID, and a PAD would change the average
    _refused(qm, tmp_path, "neither TFLite SAME nor VALID")


def test_killed_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ghnq.fileio

    qm, _ = hand_qm()

    def killed(*_a: object) -> None:
        raise KeyboardInterrupt  # the process dies between writing the temp file and the rename

    monkeypatch.setattr(ghnq.fileio.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        T.write_tflite(qm, tmp_path / "m_int8.tflite")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------
# The command


def _cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        run_cli(T.main, argv)
    return int(e.value.code or 0), capsys.readouterr().err


def test_command_writes_verified_artifacts(tmp_path: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o"
    # default tolerance (≤ 1 step, ≥ 99.9 % top-1 vs the sim with the delegate's own arithmetic)
    code, err = _cli(["--arch", str(ROOT / "specs/tiny-mbv2.yaml"), "--out", str(out), "--calib-images", "32",
                      "--verify-images", "24", "--reference-images", "24",
                      "--quiet", "--per-layer", "--per-layer-images", "4"], capsys)
    assert code == 0, err
    r = json.loads((out / "report.json").read_text())
    for key in ("artifact", "images", "top1_agreement", "max_step_error", "p99_step_error", "accuracy_artifact",
                "accuracy_sim", "accuracy_float", "weights"):
        assert key in r, key
    assert Path(r["artifact"]) == out / "tiny-mbv2_int8.tflite" and r["images"] == 24 and r["passed"]
    assert r["exact"][0]["differing_codes"] == 0 and r["exact"][0]["codes"] == 240
    assert (out / "tiny-mbv2_fp32.tflite").is_file() and (out / "report.md").is_file()
    assert all(Path(p).is_file() for p in r["plots"]) and len(r["per_layer"]) == len(load_qm(out).ops)
    x = np.load(out / "verify" / "inputs_int8.npy")
    e = np.load(out / "verify" / "expected_int8.npy")
    y = np.load(out / "verify" / "labels.npy")
    assert x.dtype == np.int8 and x.shape == (24, 32, 32, 3) and e.dtype == np.int8 and e.shape == (24, 10)
    assert y.shape == (24,) and np.array_equal(e, simulate(load_qm(out), (x.astype(np.int16) + 128).astype(np.uint8),
                                                                     rounding="xnnpack"))
    assert r["weights"].startswith("GHN-Q prediction (ghnq.pt")  # the shipped checkpoint is the default
    # a miscomputing runtime (every image's first logit 2 codes off): written, but the exit code says it failed
    real_call = T.LiteRTRunner.__call__

    def off_by_two(self: T.LiteRTRunner, x: np.ndarray) -> np.ndarray:
        y = real_call(self, x).astype(np.int16)
        y[:, 0] = np.where(y[:, 0] > 0, y[:, 0] - 2, y[:, 0] + 2)
        return y.astype(np.int8)

    monkeypatch.setattr(T.LiteRTRunner, "__call__", off_by_two)
    code, err = _cli(["--arch", str(ROOT / "specs/tiny-mbv2.yaml"), "--out", str(out), "--calib-images", "32",
                      "--verify-images", "24", "--reference-images", "8", "--quiet"], capsys)
    r = json.loads((out / "report.json").read_text())
    assert code == 1 and not r["passed"] and r["max_step_error"] == 2, err
    assert any("max step error 2 > 1" in f for f in r["failures"])


def load_qm(out: Path) -> QuantizedModel:
    from calibration.qmodel import load

    return load(next(out.glob("*.qm")))


@pytest.mark.parametrize("args, match", [
    (["--arch", "specs/nope.yaml"], "nope.yaml"),
    (["--arch", "{spec_bad}"], "stem"),
    (["--arch", "specs/tiny-mbv2.yaml", "--weights", "missing.pt"], "missing.pt"),
    (["--arch", "specs/tiny-mbv2.yaml", "--bits", "3"], "--bits"),
    (["--arch", "specs/tiny-mbv2.yaml", "--method", "magic"], "--method"),
    (["--arch", "specs/tiny-mbv2.yaml", "--data-root", "/no/such/dir"], "--data-root"),
    (["--arch", "{spec_gray}"], "gray.yaml: input: 1 channel(s)"),
])
def test_bad_input_exits_2_and_writes_nothing(args: list[str], match: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nstem: {out: -3}\nstages: []\n")
    gray = tmp_path / "gray.yaml"  # valid grammar, but the data is RGB: refused before any work
    gray.write_text("name: gray\ninput: [1, 28, 28]\nstages: [{block: basic, out: 8}]\n")
    args = [a.replace("{spec_bad}", str(bad)).replace("{spec_gray}", str(gray)) for a in args]
    code, err = _cli([*args, "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert code == 2 and match in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_unsupported_model_exits_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(qm: QuantizedModel) -> None:
        raise UserError("op 3 (gelu): no TFLite mapping")  # what check_supported says for an unmapped op

    monkeypatch.setattr(T, "check_supported", refuse)
    code, err = _cli(["--arch", str(ROOT / "specs/tiny-mbv2.yaml"), "--out", str(tmp_path / "o"),
                      "--calib-images", "8", "--quiet"], capsys)
    assert code == 2 and "no TFLite mapping" in err
    assert not (tmp_path / "o").exists()


def test_bn_statistics_are_measured_unless_the_weights_carry_them(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """--weights holding placeholder BN statistics (mean 0 / var 1: untrained, or predicted without --bn-images)
    are re-estimated by default; measured ones are kept; the report says which."""
    spec = tmp_path / "b.yaml"
    spec.write_text("name: b\ninput: [3, 16, 16]\nstem: {out: 8}\nstages: [{block: basic, out: 8}]\n")
    torch.manual_seed(0)
    model = build_model(load_spec(spec))
    torch.save(model.state_dict(), tmp_path / "placeholder.pt")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.fill_(4.0)
    torch.save(model.state_dict(), tmp_path / "measured.pt")
    for weights, expected in (("placeholder", True), ("measured", False)):
        out = tmp_path / weights
        code, err = _cli(["--arch", str(spec), "--weights", str(tmp_path / f"{weights}.pt"), "--out", str(out),
                          "--calib-images", "16", "--verify-images", "8", "--reference-images", "4",
                          "--max-step-error", "100", "--min-agreement", "0", "--quiet"], capsys)
        assert code == 0, err
        assert json.loads((out / "report.json").read_text())["calibration"]["bn_recalibrated"] is expected


def test_error_with_progress_bar_starts_its_own_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Without --quiet the stage bar is on screen when the spec is refused: the bar is ended first, so the
    # error is a line of its own (it used to be glued to the bar, which was then drawn again under it).
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nstem: {out: -3}\nstages: []\n")
    code, err = _cli(["--arch", str(bad), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "export.tflite" in err
    assert "\nerror: " in err and err.rstrip("\n").splitlines()[-1].startswith("error: "), err
    assert not (tmp_path / "o").exists()


def test_fewer_outputs_than_cifar_classes_is_noted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = tmp_path / "seven.yaml"
    spec.write_text("name: seven\nnum_classes: 7\nstem: {out: 8}\nstages: [{block: basic, out: 16, stride: 2}]\n")
    out = tmp_path / "o"
    code, err = _cli(["--arch", str(spec), "--out", str(out), "--calib-images", "16", "--verify-images", "16",
                      "--reference-images", "8", "--quiet"], capsys)
    assert code == 0, err
    r = json.loads((out / "report.json").read_text())
    assert any("7 outputs and CIFAR-10 10 classes" in n for n in r["notes"]), r.get("notes")
    assert "- note: the model has 7 outputs" in (out / "report.md").read_text()


def test_mul_multiplier_is_litert_float32_arithmetic() -> None:
    """An SE product x · mean(x) with the scales of a tiny-mbv2 layer where LiteRT's MUL multiplier (its Prepare
    multiplies and divides the float32 scales in float32) and a double computation differ in the last bit: the
    integer reference and the sim must follow LiteRT's reference kernel code for code."""
    s_x, s_out = 0.0235294122248888, 0.016874361783266068
    double = reference.quantize_multiplier(s_x * INPUT_SCALE / s_out)
    single = reference.quantize_multiplier(reference.mul_scale(s_x, INPUT_SCALE, s_out))
    products = np.arange(-32640, 65026)  # every (x - zp)(gate - zp) int8 can make
    differ = products[reference.multiply_by_quantized_multiplier(products, *double)
                      != reference.multiply_by_quantized_multiplier(products, *single)]
    assert 5577 in differ  # = 143 · 39: one x code and one gate code below

    def act(name: str, shape: list[int], scale: float) -> Tensor:
        return Tensor(name, shape, "int8", np.array([scale], np.float32), np.array([-128]))

    qm = QuantizedModel(
        ops=[Op("mean", ["x"], ["gate"], {"axes": [1, 2], "keepdims": True}),
             Op("mul", ["x", "gate"], ["y"], {"fused": "none"})],
        tensors={"x": act("x", [1, 16, 16, 4], s_x), "gate": act("gate", [1, 1, 1, 4], INPUT_SCALE),
                 "y": act("y", [1, 16, 16, 4], s_out)},
        input="x", output="y")
    # pixel = x code + 128. Channel 0: one 143 and the rest 6s and 5s, so its mean is 6.5 · s_x and the gate
    # code is 39 - 128; the other channels random.
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 4)).astype(np.uint8)
    images[:, :, :, 0] = 6
    images[:, 0, :9, 0] = 5
    images[:, 15, 15, 0] = 143
    want, env = reference.run(qm, images, capture=True)
    assert np.any((env["x"].astype(np.int64) + 128) * (env["gate"].astype(np.int64) + 128) == 5577)
    got = T.LiteRTRunner(T.build_tflite(qm), "ref")(input_codes(images))
    assert np.array_equal(got, want)
    assert np.array_equal(simulate(qm, images).transpose(0, 2, 3, 1), want)  # the sim answers NCHW
