"""The SGD baseline trainer on real CIFAR-10: trains, checkpoints atomically, resumes exactly after kill -9."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ghnq.cli import UserError
from ghnq.data import default_data_root
from ghnq.spec import build_model, parse_spec
from ghnq.train import augment, load_weights, main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (default_data_root() / "train").is_dir(), reason="CIFAR-10 not present")
TINY = "name: tiny\nstem: {out: 8}\nstages:\n  - {block: conv, out: 16, stride: 2}\n  - {block: basic, out: 16}\n"


def _train(spec: Path, out: Path, *extra: str, epochs: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ghnq.train", "--arch", str(spec), "--out", str(out), "--epochs", str(epochs),
           "--batch-size", "32", "--train-images", "320", "--eval-images", "200", "--threads", "1",
           "--checkpoint-every", "0", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_augment_keeps_content() -> None:
    x = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8)
    y = augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == torch.uint8
    # Each output is a crop of the zero-padded (maybe flipped) input: its pixels come from the input or are 0.
    assert set(y[0].unique().tolist()) <= set(x[0].unique().tolist()) | {0}


@pytest.mark.slow
def test_train_kill9_resume_is_exact(tmp_path: Path) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    # 30 epochs of 10 steps: the tiny net runs a step in milliseconds, so a short run can finish between two
    # polls of its checkpoint; 300 steps leave the kill a window of hundreds of steps.
    ref = _train(spec, tmp_path / "ref", epochs=30)
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out
    assert "test top-1" in out

    proc = _train(spec, tmp_path / "killed", epochs=30)
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if ckpt.exists() and torch.load(ckpt, weights_only=False)["step"] >= 12:
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "weights.pt").exists()
    step = torch.load(ckpt, weights_only=False)["step"]
    assert 12 <= step < 300  # killed mid-run (300 steps in all)
    resumed = _train(spec, tmp_path / "killed", "--resume", epochs=30)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert f"resumed at step {step}/300" in out
    a = torch.load(tmp_path / "ref" / "weights.pt")
    b = torch.load(tmp_path / "killed" / "weights.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k  # same batches, same augmentation, same optimizer state


def test_load_weights_errors(tmp_path: Path) -> None:
    model = build_model(parse_spec(TINY))
    with pytest.raises(UserError, match="not found"):
        load_weights(model, tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable weights file"):
        load_weights(model, tmp_path / "junk.pt")
    other = build_model(parse_spec(TINY.replace("out: 16, stride", "out: 24, stride")))
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(UserError, match="do not fit this architecture"):
        load_weights(model, tmp_path / "other.pt")
    state = model.state_dict()
    state["stem.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(UserError, match="NaN or Inf"):
        load_weights(model, tmp_path / "nan.pt")


def test_declared_input_size_trains_and_specs_the_data_cannot_feed_are_refused(tmp_path: Path) -> None:
    """A spec declaring a non-CIFAR input size trains on resized batches; one whose channels or classes the data
    cannot supply is refused with the file and key before any data is loaded."""
    rect = tmp_path / "rect.yaml"
    rect.write_text(TINY.replace("name: tiny\n", "name: rect\ninput: [3, 20, 28]\n"))
    proc = _train(rect, tmp_path / "r", epochs=1)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "test top-1" in out, out
    for extra, words in (("input: [1, 32, 32]\n", "gray.yaml: input: 1 channel(s)"),
                         ("num_classes: 2\n", "gray.yaml: num_classes: 2; the training labels")):
        (tmp_path / "gray.yaml").write_text(TINY.replace("name: tiny\n", "name: gray\n" + extra))
        with pytest.raises(UserError, match=re.escape(words)):
            main(["--arch", str(tmp_path / "gray.yaml"), "--out", str(tmp_path / "g")])
    assert not (tmp_path / "g").exists()


def test_subsets_are_class_balanced() -> None:
    """--train-images / --eval-images take a class-balanced subset (the folders are class-sorted: a plain
    prefix of 25,000 training images once trained nets on 5 of the 10 classes)."""
    import numpy as np

    from ghnq.data import load_cifar10
    from ghnq.train import balanced_subset

    x, y = load_cifar10("test", None, progress=False)
    assert len(set(y[:2000].tolist())) < 10  # the trap: the stored order is class-sorted
    xs, ys = balanced_subset(x, y, 2000)
    assert np.array_equal(np.bincount(ys, minlength=10), np.full(10, 200))
    assert len(xs) == 2000 and np.array_equal(xs[0], x[np.flatnonzero(y == ys[0])[0]])
