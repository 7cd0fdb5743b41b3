"""ARM verification without a board: Debian's aarch64 Python + aarch64 LiteRT wheels under qemu-user.

The aarch64 root is built by scripts/make_arm_root.sh (debootstrap + dpkg-deb -x + pip --platform; cached
under ~/.cache/ghnq/arm-root); on a fresh machine the first test here builds it. Then the same bundle runs
on x86 and on emulated aarch64 (-cpu neoverse-n1), and once more under qemu's default `-cpu max`, whose SME
makes LiteRT's XNNPACK int8 kernels silently wrong: verification must catch that.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_devices_common import NAME, copy_export

ROOT = Path(__file__).resolve().parents[1]
INT8 = f"{NAME}_int8.tflite"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not shutil.which("qemu-aarch64-static") or not shutil.which("debootstrap"),
                       reason="needs qemu-user-static and debootstrap: `bash scripts/system-deps.sh` as root"),
]


@pytest.fixture(scope="module")
def arm_root() -> str:
    t = time.time()
    r = subprocess.run(["bash", str(ROOT / "scripts" / "make_arm_root.sh")], capture_output=True, text=True,
                       timeout=900)
    if r.returncode == 3:  # not root, nothing cached: debootstrap cannot run
        pytest.skip(r.stderr.strip())
    assert r.returncode == 0, r.stderr
    print(f"\naarch64 root ready in {time.time() - t:.1f} s: {r.stdout.strip()}")
    return r.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    export = copy_export(tmp_path_factory.mktemp("qemu") / NAME)
    r = subprocess.run([sys.executable, "-m", "devices.bundle", str(export)], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    return export / "bundle"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "devices.run", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


def test_arm_root_is_real_aarch64_and_cached(arm_root: str):
    python = Path(arm_root, "usr/bin/python3.11").resolve()
    header = python.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    litert = list(Path(arm_root, "opt/ghnq-wheels/ai_edge_litert").glob("_pywrap_litert_interpreter_wrapper*.so"))
    assert litert and int.from_bytes(litert[0].read_bytes()[18:20], "little") == 183
    t = time.time()
    again = subprocess.run(["bash", str(ROOT / "scripts" / "make_arm_root.sh")], capture_output=True, text=True)
    assert again.stdout.strip() == arm_root and time.time() - t < 10  # cached: nothing rebuilt


def test_aarch64_run_agrees_with_x86(arm_root: str, bundle: Path, tmp_path: Path):
    x86 = _run("--target", "local", "--artifact", INT8, "--skip-latency", "--out", str(tmp_path / "x86"),
               str(bundle))
    assert x86.returncode == 0, x86.stderr
    arm = _run("--target", "qemu-aarch64", "--arm-root", arm_root, "--artifact", INT8, "--runs", "5",
               "--out", str(tmp_path / "arm"), str(bundle))
    assert arm.returncode == 0, arm.stderr
    res_x86 = json.loads((tmp_path / "x86" / "result.json").read_text())
    res_arm = json.loads((tmp_path / "arm" / "result.json").read_text())
    assert res_x86["device"]["machine"] == "x86_64" and res_arm["device"]["machine"] == "aarch64"
    assert res_arm["verified"] and res_arm["target"] == "qemu-aarch64-neoverse-n1"
    out_x86 = np.load(tmp_path / "x86" / f"{INT8}.outputs.npy")
    out_arm = np.load(tmp_path / "arm" / f"{INT8}.outputs.npy")
    assert out_arm.shape == out_x86.shape == (1000, 10)
    agreement = float(np.mean(out_arm.argmax(1) == out_x86.argmax(1)))
    assert agreement >= 0.999, f"aarch64 vs x86 top-1 agreement {agreement:.4f}"
    assert int(np.abs(out_arm.astype(int) - out_x86).max()) <= 1
    assert res_arm["artifacts"][INT8]["latency_ms"]["runs"] == 5


def test_miscomputing_cpu_model_is_caught(arm_root: str, bundle: Path, tmp_path: Path):
    r = _run("--target", "qemu-aarch64", "--arm-root", arm_root, "--qemu-cpu", "max", "--artifact", INT8,
             "--skip-latency", "--limit", "200", "--out", str(tmp_path / "max"), str(bundle))
    assert r.returncode == 1, r.stderr
    assert "VERIFICATION FAILED" in r.stderr
    assert f"{INT8}: logit error" in r.stderr and "int8 steps > 2 allowed" in r.stderr
    result = json.loads((tmp_path / "max" / "result.json").read_text())
    assert not result["verified"] and result["target"] == "qemu-aarch64-max"
    assert result["artifacts"][INT8]["max_step_error"] > 2


def test_quiet_run_prints_only_the_result(arm_root: str, bundle: Path, tmp_path: Path):
    # no --arm-root: the cached root comes from make_arm_root.sh, whose announcement --quiet holds back
    r = _run("--target", "qemu-aarch64", "--artifact", INT8, "--skip-latency", "--limit", "50", "--quiet",
             "--out", str(tmp_path / "q"), str(bundle))
    assert r.returncode == 0, r.stderr
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qemu-aarch64-neoverse-n1: verified"), lines
