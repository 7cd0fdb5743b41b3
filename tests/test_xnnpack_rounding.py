"""simulate(rounding="xnnpack") reproduces LiteRT's default XNNPACK delegate code for code.

Each op alone under the delegate, fed the xnnpack sim's own input codes, must give the sim's output codes
(0 differing codes, per op kind), and so must the whole network end to end; models: the hand-built QM with
every op kind, and tiny-mbv2 / resnet20 calibrated on real CIFAR-10 images (seeded random weights here; the
SGD-trained numbers are in BENCHMARKS.md).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch

from calibration import calibrate
from calibration.qmodel import QuantizedModel, input_codes
from calibration.sim import simulate
from export import tflite as T
from ghnq.data import load_eval_images
from ghnq.spec import build_model, load_spec
from tests.test_export_tflite import ROOT, hand_qm

N_IMAGES = 6


def spec_qm(name: str) -> tuple[QuantizedModel, np.ndarray]:
    torch.manual_seed(0)
    model = build_model(load_spec(ROOT / "specs" / f"{name}.yaml"))
    images, _, _ = load_eval_images(32 + N_IMAGES, quiet=True)
    qm = calibrate(model, images[:32], bn_recalibrate=True, progress=False, meta={"name": name})
    return qm, images[32:]


def get(name: str) -> tuple[QuantizedModel, np.ndarray]:
    return hand_qm() if name == "hand" else spec_qm(name)


def per_op_differences(qm: QuantizedModel, images: np.ndarray) -> dict[str, list[int]]:
    """op kind → [differing codes, codes]: every op run alone in the delegate on the sim's inputs."""
    _, env = simulate(qm, images, capture=True, rounding="xnnpack")
    diff: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for op in qm.ops:
        got = T.LiteRTRunner(T.build_tflite(qm, ops=[op]), "xnnpack").run_named(env)
        want = env[op.outputs[0]].reshape(got.shape)
        diff[op.kind][0] += int((got != want).sum())
        diff[op.kind][1] += int(got.size)
    return dict(diff)


@pytest.mark.parametrize("name", ["hand", "tiny-mbv2", "resnet20"])
def test_xnnpack_sim_equals_delegate_per_op_and_end_to_end(name: str) -> None:
    qm, images = get(name)
    diff = per_op_differences(qm, images)
    assert all(d == 0 for d, _ in diff.values()), diff
    out = T.LiteRTRunner(T.build_tflite(qm), "xnnpack")(input_codes(images))
    sim = simulate(qm, images, rounding="xnnpack")
    assert np.array_equal(out, sim), f"{int((out != sim).sum())} of {out.size} logit codes differ"


def test_runners_declare_their_arithmetic() -> None:
    qm, _ = hand_qm()
    data = T.build_tflite(qm)
    assert T.LiteRTRunner(data, "xnnpack").arithmetic == "xnnpack"
    assert T.LiteRTRunner(data, "ref").arithmetic == "tflite"


def test_unknown_rounding_is_refused() -> None:
    qm, images = hand_qm()
    with pytest.raises(ValueError, match="xnnpack"):
        simulate(qm, images[:1], rounding="nearest")
