"""ghnq.pipeline: every stage on a tiny spec, bad input refused before stage 1, resume from the last finished stage
(after kill -9, and after a changed flag)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ghnq.cli import UserError
from ghnq.data import default_data_root
from ghnq.pipeline import STAGES, main

ROOT = Path(__file__).resolve().parents[1]
# The refine stage's search draws its mini-batches from the CIFAR-10 training set (no embedded fallback).
needs_train = pytest.mark.skipif(not (default_data_root() / "train").is_dir(), reason="CIFAR-10 train not present")
FAST = ["--images", "100", "--calib-images", "32", "--reference-images", "20", "--train-images", "1000",
        "--runs", "3", "--quiet"]


def tiny(folder: Path) -> Path:
    path = folder / "tiny-p.yaml"
    path.write_text("name: tiny-p\nstem: {out: 8, kernel: 3, stride: 1, act: relu}\n"
                    "stages:\n  - {block: conv, out: 16, kernel: 3, stride: 2}\n")
    return path


def stage_files(out: Path) -> dict[str, tuple[int, bytes]]:
    return {p.parent.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*/stage.json")}


def test_help_explains_every_stage(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for stage in STAGES:
        assert f" {stage} " in text, stage
    for flag in ("--bits", "--budget-evals", "--formats", "--target"):
        assert flag in text


@pytest.mark.parametrize("argv, match", [
    (["--bits", "3"], "--bits 3"),
    (["--formats", "tflite,onnx"], "--formats"),
    (["--bits", "4", "--budget-evals", "10"], "--budget-evals 10"),
    (["--target", "telnet://pi"], "--target"),
    (["--weights", "/nonexistent/w.pt"], "--weights"),
    (["--data-root", "/nonexistent"], "--data-root"),
    (["--method", "vibes"], "--method"),
    (["--images", "0"], "--images"),
])
def test_bad_input_fails_before_the_first_stage(tmp_path: Path, argv: list[str], match: str) -> None:
    out = tmp_path / "p"
    with pytest.raises(UserError, match=match):
        main(["--arch", str(tiny(tmp_path)), "--out", str(out), *argv])
    assert not out.exists()


def test_bad_spec_fails_before_the_first_stage(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("stem: {out: 8}\nstages:\n  - {block: conv, out: 16, kernel: 4}\n")
    with pytest.raises(UserError, match="kernel"):
        main(["--arch", str(bad), "--out", str(tmp_path / "p")])
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
@needs_train
def test_pipeline_4bit_all_stages_then_resume(tmp_path: Path) -> None:
    out = tmp_path / "p"
    argv = ["--arch", str(tiny(tmp_path)), "--bits", "4", "--budget-evals", "100", "--target", "local",
            "--out", str(out), *FAST]
    rc = main(argv)
    assert rc in (0, 1)  # 1 = an artifact missed the tolerance (possible with random weights); still reported
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] == (rc == 0)
    stages = [r["stage"] for r in report["stages"]]
    assert stages == ["predict", "quantize", "refine", "export (tflite)", "verify (tflite)", "device (tflite)"]
    acc = {r["stage"]: r["accuracy"] for r in report["stages"]}
    for s in ("predict", "quantize", "refine", "verify (tflite)", "device (tflite)"):
        assert 0.0 <= acc[s] <= 1.0, s
    rec = report["stage_records"]
    assert rec["refine"]["evolve"]["evals"] > 0
    assert Path(rec["refine"]["outputs"]["qm"]).is_file()
    assert Path(rec["export"]["formats"]["tflite"]["artifact"]).is_file()
    # the device ran the very artifact the export stage wrote, and the sim's codes it was checked against
    assert rec["device"]["formats"]["tflite"]["artifacts"]["tiny-p_int8.tflite"]["accuracy"] == acc["device (tflite)"]
    assert "| refine |" in (out / "report.md").read_text()
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"

    # A finished run: everything is kept.
    before = stage_files(out)
    assert set(before) == {f"{n}-{s}" for n, s in enumerate(STAGES, 1)}
    assert main(argv) == rc
    assert stage_files(out) == before

    # A run stopped after the refine stage: predict, quantize, refine are kept; export and later run again.
    for d in ("4-export", "5-verify", "6-device"):
        (out / d / "stage.json").unlink()
    assert main(argv) == rc
    after = stage_files(out)
    for d in ("1-predict", "2-quantize", "3-refine"):
        assert after[d] == before[d], d
    assert after["4-export"][0] != before["4-export"][0]

    # A changed verification flag: stages before verify are kept, verify and device run again.
    before = stage_files(out)
    assert main([*argv, "--reference-images", "10"]) in (0, 1)
    after = stage_files(out)
    for d in ("1-predict", "2-quantize", "3-refine", "4-export"):
        assert after[d] == before[d], d
    assert after["5-verify"] != before["5-verify"] and after["6-device"] != before["6-device"]


@pytest.mark.slow
@needs_train
def test_resume_after_kill_9_keeps_finished_stages(tmp_path: Path) -> None:
    out = tmp_path / "p"
    argv = ["--arch", str(tiny(tmp_path)), "--bits", "4", "--budget-evals", "400", "--checkpoint-every", "0.5",
            "--out", str(out), *FAST]
    proc = subprocess.Popen([sys.executable, "-m", "ghnq.pipeline", *argv], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not (out / "2-quantize" / "stage.json").exists():
        time.sleep(0.05)
    time.sleep(3)  # into the refine stage's search
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = stage_files(out)
    assert {"1-predict", "2-quantize"} <= set(kept), "the quantize stage never finished"
    assert not (out / "report.json").exists() or "6-device" in kept

    assert main(argv) in (0, 1)
    after = stage_files(out)
    for d, v in kept.items():  # every stage finished before the kill was kept, not redone
        assert after[d] == v, d
    assert set(after) == {f"{n}-{s}" for n, s in enumerate(STAGES, 1)}
    report = json.loads((out / "report.json").read_text())
    assert report["stage_records"]["refine"]["evolve"]["evals"] > 0


@pytest.mark.slow
def test_pipeline_8bit_both_formats_on_local_target(tmp_path: Path) -> None:
    out = tmp_path / "p"
    rc = main(["--arch", str(tiny(tmp_path)), "--bits", "8", "--formats", "tflite,executorch", "--target", "local",
               "--out", str(out), *FAST])
    report = json.loads((out / "report.json").read_text())
    assert rc == (0 if report["passed"] else 1)
    rec = report["stage_records"]
    assert "skipped" in rec["refine"]  # 8-bit: no search
    assert set(rec["verify"]["formats"]) == set(rec["device"]["formats"]) == {"tflite", "executorch"}
    dev = rec["device"]["formats"]["executorch"]["artifacts"]["tiny-p_xnnpack.pte"]
    assert dev["runtime"].startswith("executorch") and 0.0 <= dev["accuracy"] <= 1.0 and dev["latency_ms"] > 0
    # every artifact was checked against the codes of the one QuantizedModel: both formats saw the same sim
    assert rec["verify"]["formats"]["tflite"]["accuracy_sim"] == rec["verify"]["formats"]["executorch"]["accuracy_sim"]
