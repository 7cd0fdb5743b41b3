"""devices.run --target adb, with a stand-in `adb` executable.

No Android device, emulator or adbd exists on this machine (or in CI), so the test puts a small stand-in
`adb` first on PATH. It records every argument list it gets, and does what adb would do with this machine
as the "device": `push` copies files, `shell` hands its joined arguments to `sh -c` (exactly what adbd does
with them), `pull` copies back. What is tested is the runner: the exact adb commands, their quoting, and
that the eval script it starts produces the same result format as every other target.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_devices_common import NAME, copy_export

ROOT = Path(__file__).resolve().parents[1]

FAKE_ADB = r'''#!{python}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_ADB_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
if args[:1] == ["-s"]:
    args = args[2:]
cmd, rest = args[0], args[1:]
if cmd == "push":
    *sources, dest = rest
    for s in sources:
        shutil.copy(s, os.path.join(dest, os.path.basename(s)) if dest.endswith("/") else dest)
    print(f"{{len(sources)}} files pushed")
elif cmd == "pull":
    shutil.copy(rest[0], rest[1])
elif cmd == "shell":
    sys.exit(subprocess.run(["sh", "-c", " ".join(rest)]).returncode)
else:
    sys.exit(f"stand-in adb: unsupported command {{cmd}}")
'''


@pytest.fixture()
def fake_adb(tmp_path: Path, monkeypatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    adb = bin_dir / "adb"
    adb.write_text(FAKE_ADB.format(python=sys.executable))
    adb.chmod(0o755)
    log = tmp_path / "adb-calls.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ADB_LOG", str(log))
    return log


def test_adb_push_shell_pull_exact_arguments(fake_adb: Path, tmp_path: Path):
    export = copy_export(tmp_path / NAME)
    assert subprocess.run([sys.executable, "-m", "devices.bundle", str(export)], cwd=ROOT).returncode == 0
    bundle = export / "bundle"
    device_dir = tmp_path / "sdcard dir; $(touch pwned)"  # the "device" path, quoted by the runner
    out = tmp_path / "res"
    r = subprocess.run([sys.executable, "-m", "devices.run", "--target", "adb:emulator-5554", "--python",
                        sys.executable, "--remote-dir", str(device_dir), "--out", str(out), "--runs", "3",
                        str(bundle)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    calls = [json.loads(line) for line in fake_adb.read_text().splitlines()]
    files = [str(p) for p in sorted(bundle.iterdir())]
    q = f"'{device_dir}'"  # shlex quoting of a path with spaces, ';' and '$()'
    assert calls == [
        ["-s", "emulator-5554", "shell", f"mkdir -p -- {q}"],
        ["-s", "emulator-5554", "push", *files, f"{device_dir}/"],
        ["-s", "emulator-5554", "shell",
         f"cd -- {q} && {sys.executable} eval.py . --out results --threads 1 --runs 3"],
        ["-s", "emulator-5554", "pull", f"{device_dir}/results/result.json", str(out / ".result.json.part")],
        *[["-s", "emulator-5554", "pull", f"{device_dir}/results/{a}.outputs.npy",
           str(out / f".{a}.outputs.npy.part")] for a in (f"{NAME}_fp32.tflite", f"{NAME}_int8.tflite")],
    ]
    assert not list(tmp_path.rglob("pwned")) and not (ROOT / "pwned").exists()
    result = json.loads((out / "result.json").read_text())
    assert result["verified"] and result["target"] == "adb-emulator-5554"
    rec = result["artifacts"][f"{NAME}_int8.tflite"]
    assert rec["images"] == 1000 and rec["max_step_error"] <= 1 and rec["latency_ms"]["runs"] == 3
    assert np.load(out / rec["outputs"]).shape == (1000, 10)


def test_adb_shell_failure_is_reported(fake_adb: Path, tmp_path: Path):
    export = copy_export(tmp_path / NAME)
    assert subprocess.run([sys.executable, "-m", "devices.bundle", str(export)], cwd=ROOT).returncode == 0
    r = subprocess.run([sys.executable, "-m", "devices.run", "--target", "adb", "--python", "/nonexistent/python3",
                        "--remote-dir", str(tmp_path / "dev"), str(export / "bundle")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "eval.py exited with 127" in r.stderr  # the device shell's "not found"
    calls = [json.loads(line) for line in fake_adb.read_text().splitlines()]
    assert [c[0] for c in calls] == ["shell", "push", "shell"]  # no "-s" without a serial; nothing pulled
