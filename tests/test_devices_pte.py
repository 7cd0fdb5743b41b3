"""eval.py on the real exporter's ExecuTorch .pte (XNNPACK, int8 NCHW in, int8 out) in the ExecuTorch runtime.

`python -m export.executorch` writes the .pte, its fp32 twin, verify/ and report.json; the bundle made from
that folder, run by devices.run, must give the very numbers the exporter's own verification reported:
the same runtime on the same int8 inputs computes the same codes. (No aarch64 ExecuTorch here: PyPI's aarch64
torch that executorch 1.5.1 links against does not install on this stack, see ../shared/STACK.md.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pte_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pte") / "tiny-mbv2"
    r = subprocess.run([sys.executable, "-m", "export.executorch", "--arch", str(ROOT / "specs" / "tiny-mbv2.yaml"),
                        "--out", str(out), "--calib-images", "64", "--verify-images", "200",
                        "--reference-images", "10", "--quiet"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    # exit 1 = the export's own tolerance failed (random weights when no GHN-Q checkpoint ships): still a
    # complete export folder, and the device must then fail the same way
    assert r.returncode in (0, 1), r.stderr[-3000:]
    return out


def test_pte_bundle_reproduces_the_exporters_verification(pte_export: Path, tmp_path: Path):
    r = subprocess.run([sys.executable, "-m", "devices.bundle", str(pte_export)], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((pte_export / "bundle" / "manifest.json").read_text())
    assert {a["file"]: a["precision"] for a in manifest["artifacts"]} == {
        "tiny-mbv2_xnnpack.pte": "int8", "tiny-mbv2_fp32.pte": "fp32"}
    r = subprocess.run([sys.executable, "-m", "devices.run", "--target", "local", "--runs", "5", "--out",
                        str(tmp_path), str(pte_export / "bundle")], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    report = json.loads((pte_export / "report.json").read_text())
    assert r.returncode == (0 if report["passed"] else 1), r.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    rec = result["artifacts"]["tiny-mbv2_xnnpack.pte"]
    assert rec["runtime"].startswith("executorch ") and rec["input"] == {"shape": [1, 3, 32, 32], "dtype": "int8"}
    assert rec["images"] == report["images"] == 200
    for key in ("top1_agreement", "max_step_error", "p99_step_error", "accuracy_sim"):
        assert rec[key] == pytest.approx(report[key]), key
    assert rec["accuracy"] == pytest.approx(report["accuracy_artifact"])
    assert result["verified"] == report["passed"]
    expected = np.load(pte_export / "verify" / "expected_int8.npy")
    assert np.load(tmp_path / rec["outputs"]).shape == expected.shape
    assert result["artifacts"]["tiny-mbv2_fp32.pte"]["input"]["dtype"] == "float32"


def test_quiet_pte_run_holds_back_the_runtime_chatter(pte_export: Path, tmp_path: Path):
    """ExecuTorch logs its cpuinfo probing and thread-pool resets on fd 2; eval.py --quiet holds them back."""
    bundle = pte_export / "bundle"
    if not bundle.exists():
        assert subprocess.run([sys.executable, "-m", "devices.bundle", str(pte_export)], cwd=ROOT).returncode == 0
    r = subprocess.run([sys.executable, str(bundle / "eval.py"), str(bundle), "--out", str(tmp_path), "--runs", "2",
                        "--quiet"], capture_output=True, text=True, timeout=600)
    report = json.loads((pte_export / "report.json").read_text())
    assert r.returncode == (0 if report["passed"] else 1), r.stderr
    assert r.stdout == "" and (r.stderr == "" if report["passed"] else r.stderr.startswith("VERIFICATION FAILED")), \
        r.stderr
    assert set(json.loads((tmp_path / "result.json").read_text())["artifacts"]) == {
        "tiny-mbv2_xnnpack.pte", "tiny-mbv2_fp32.pte"}
