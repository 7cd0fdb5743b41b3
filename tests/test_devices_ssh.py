"""devices.run over real ssh: an sshd on 127.0.0.1 started by this test (own config, throw-away keys, free port).

The "remote board" is this machine reached through a real ssh connection: the bundle is copied with rsync
over ssh, eval.py runs in the sshd session, result.json comes back the same way. For the dropped-connection
test the remote Python is aarch64 Python under qemu (slow enough to cut the link mid-run, and a fair model
of a Raspberry Pi); the per-connection sshd processes are killed after the first chunk is saved.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.test_devices_common import NAME, copy_export

ROOT = Path(__file__).resolve().parents[1]
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
MARKER = f"pwned-{uuid.uuid4().hex[:8]}"  # a file a shell would create if it ran part of a path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if not os.path.exists(SSHD) or not shutil.which("ssh"):
        pytest.skip("sshd/ssh not installed: `bash scripts/system-deps.sh` (as root) installs openssh-server")
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    port, user = _free_port(), getpass.getuser()
    (d / "sshd_config").write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d / 'host_key'}
PidFile {d / 'sshd.pid'}
AuthorizedKeysFile {d / 'authorized_keys'}
AllowUsers {user}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
StrictModes no
Subsystem sftp internal-sftp
LogLevel ERROR
""")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory (the package's own)
    with open(d / "sshd.log", "w") as log:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=log)
    opts = [f"UserKnownHostsFile={d / 'known_hosts'}", "StrictHostKeyChecking=no", "IdentitiesOnly=yes",
            "LogLevel=ERROR"]
    target = f"ssh://{user}@127.0.0.1:{port}"
    args = ["--target", target, "-i", str(d / "client_key"), *[a for o in opts for a in ("--ssh-option", o)]]
    ssh = ["ssh", "-p", str(port), "-i", str(d / "client_key"), *[a for o in opts for a in ("-o", o)],
           f"{user}@127.0.0.1"]
    for _ in range(100):
        if subprocess.run([*ssh, "true"], capture_output=True).returncode == 0:
            break
        if proc.poll() is not None:
            pytest.fail(f"sshd exited: {(d / 'sshd.log').read_text()}")
        time.sleep(0.1)
    else:
        pytest.fail(f"sshd on port {port} never accepted a login: {(d / 'sshd.log').read_text()}")
    yield {"proc": proc, "args": args, "ssh": ssh, "dir": d}
    proc.terminate()
    proc.wait(10)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "devices.run", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def odd_export(tmp_path_factory) -> Path:
    """An export (and its bundle) under a folder name full of shell metacharacters."""
    parent = tmp_path_factory.mktemp("ssh") / f"my bundles; $(touch {MARKER}) `touch {MARKER}` 'x\" & echo"
    out = copy_export(parent / NAME)
    r = subprocess.run([sys.executable, "-m", "devices.bundle", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def _no_injection(*places: Path) -> None:
    for place in (Path.home(), ROOT, Path.cwd(), *places):
        assert not list(place.rglob(MARKER)), f"a shell ran part of a path: {MARKER} created under {place}"


def test_push_run_fetch_over_ssh_with_hostile_paths(sshd, odd_export: Path, tmp_path: Path):
    bundle = odd_export / "bundle"
    remote = tmp_path / f"remote home; $(touch {MARKER}) && rm -rf x" / "bun dle$(id)"
    out = tmp_path / "results ; `touch x`"
    r = _run(*sshd["args"], "--python", sys.executable, "--remote-dir", str(remote), "--out", str(out),
             "--runs", "5", str(bundle))
    assert r.returncode == 0, r.stderr
    assert "verified" in r.stdout
    # the bundle really went through ssh to the remote folder, named exactly as given
    assert sorted(p.name for p in remote.iterdir() if p.is_file()) == sorted(p.name for p in bundle.iterdir())
    assert (remote / "results" / "result.json").is_file()
    result = json.loads((out / "result.json").read_text())
    assert result["verified"] and result["target"].startswith("ssh-")
    local = subprocess.run([sys.executable, str(bundle / "eval.py"), str(bundle), "--skip-latency", "--out",
                            str(tmp_path / "local")], capture_output=True, text=True)
    assert local.returncode == 0, local.stderr
    for art in result["artifacts"].values():
        np.testing.assert_array_equal(np.load(out / art["outputs"]), np.load(tmp_path / "local" / art["outputs"]))
    _no_injection(tmp_path, odd_export.parent)


def test_tampered_bundle_is_refused_before_copying(sshd, odd_export: Path, tmp_path: Path):
    bundle = Path(shutil.copytree(odd_export / "bundle", tmp_path / "b"))
    (bundle / "labels.npy").write_bytes((bundle / "labels.npy").read_bytes()[:-8] + b"\0" * 8)
    remote = tmp_path / "remote"
    r = _run(*sshd["args"], "--python", sys.executable, "--remote-dir", str(remote), str(bundle))
    assert r.returncode == 2 and "bundle file 'labels.npy' fails its sha256 check" in r.stderr
    assert not remote.exists()


def test_unreachable_host_is_a_clear_error(sshd, odd_export: Path):
    port = _free_port()
    args = [a.replace(sshd["args"][1], f"ssh://{getpass.getuser()}@127.0.0.1:{port}") for a in sshd["args"]]
    r = _run(*args, "--retries", "1", str(odd_export / "bundle"))
    assert r.returncode == 2 and "connection lost 2 times" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_dropped_connection_resumes_and_loses_nothing(sshd, odd_export: Path, tmp_path: Path):
    """Kill the ssh session mid-run: the runner retries, eval.py continues from its saved chunks."""
    from devices.run import build_arm_root
    from ghnq.cli import UserError

    try:
        root = build_arm_root()
    except UserError as err:  # e.g. not root and no cached aarch64 root
        pytest.skip(f"no aarch64 root for the remote Python: {err}")
    remote_python = shlex.join(["env", f"PYTHONPATH={root}/opt/ghnq-wheels", shutil.which("qemu-aarch64-static"),
                                "-L", root, "-cpu", "neoverse-n1", f"{root}/usr/bin/python3.11"])
    bundle = odd_export / "bundle"
    remote = tmp_path / "remote pi; $(reboot)"
    chunk_dir = remote / "results" / "chunks"
    killed: list[int] = []

    def cut_the_link() -> None:
        deadline = time.time() + 600
        while time.time() < deadline:
            if chunk_dir.is_dir() and any(chunk_dir.rglob("*.npy")):
                for child in psutil.Process(sshd["proc"].pid).children(recursive=True):
                    if child.name() == "sshd":  # the per-connection server processes, not our listener
                        with contextlib.suppress(psutil.NoSuchProcess):
                            child.kill()
                            killed.append(child.pid)
                return
            time.sleep(0.05)

    cutter = threading.Thread(target=cut_the_link)
    cutter.start()
    r = _run(*sshd["args"], "--python", remote_python, "--remote-dir", str(remote), "--out", str(tmp_path / "out"),
             "--artifact", f"{NAME}_int8.tflite", "--skip-latency", "--limit", "600", str(bundle))
    cutter.join()
    assert killed, "the connection was never cut"
    assert r.returncode == 0, r.stderr
    assert "connection lost; retry 1/5" in r.stderr
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    rec = result["artifacts"][f"{NAME}_int8.tflite"]
    assert rec["images"] == 600 and 1 <= rec["resumed_chunks"] < rec["chunks"] == 12
    assert result["device"]["machine"] == "aarch64"
    outputs = np.load(tmp_path / "out" / rec["outputs"])
    local = subprocess.run([sys.executable, str(bundle / "eval.py"), str(bundle), "--artifact", f"{NAME}_int8.tflite",
                            "--skip-latency", "--limit", "600", "--out", str(tmp_path / "local")],
                           capture_output=True, text=True)
    assert local.returncode == 0, local.stderr
    # 0 results lost: every image has an output, and they are the ones an uninterrupted run gives
    np.testing.assert_array_equal(outputs, np.load(tmp_path / "local" / rec["outputs"]))
