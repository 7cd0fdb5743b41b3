"""Run a bundle's eval.py on a target and bring result.json back: one interface for every device.

    python -m devices.run --target local                    out/<name>/bundle/
    python -m devices.run --target ssh://pi@raspberrypi      out/<name>/bundle/   # Raspberry Pi (or Termux sshd)
    python -m devices.run --target ssh://pi@10.0.0.7:2222 -i ~/.ssh/pi_key out/<name>/bundle/
    python -m devices.run --target adb[:SERIAL]              out/<name>/bundle/   # Android, adb push + adb shell
    python -m devices.run --target qemu-aarch64              out/<name>/bundle/   # ARM on this x86 machine

Every target: the bundle is checked against its manifest here first (a tampered bundle is refused, naming
the file), copied, and run with the same eval.py, which checks it again on the device. Results land in
`--out` (default: <bundle>/../runs/<target>/): result.json plus each artifact's int8 outputs.

- ssh: copies with rsync (only what changed; scp when rsync is missing), runs over ssh, fetches the
  results. A dropped connection (ssh exit 255) is retried with back-off (`--retries`); eval.py saves its
  outputs per chunk, so the rerun continues where the drop stopped it. Every command is built as an
  argument list and quoted for the remote shell: bundle paths with spaces or `;$()` are plain names.
- adb: `adb push` + `adb shell` running eval.py with the device's Python (`--python`, e.g. Termux's
  python3 with numpy + ai-edge-litert); same result format.
- qemu-aarch64: Debian's aarch64 Python + aarch64 numpy/LiteRT wheels under `qemu-aarch64-static`
  (root built once by scripts/make_arm_root.sh and cached). `--qemu-cpu` picks the emulated CPU; the
  default neoverse-n1 computes LiteRT's XNNPACK int8 kernels exactly, qemu's own default `max` (with SME)
  does not — verification catches it.
Exit code: 0 verified, 1 verification failed, 2 bad input / tampered bundle / target unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from devices.bundle import verify_bundle
from ghnq.cli import UserError, run_cli
from ghnq.fileio import sha256_file

REPO = Path(__file__).resolve().parents[1]
CONNECTION_LOST = 255  # what ssh (and adb) exit with when the link drops, never an eval.py exit code
DEFAULT_QEMU_CPU = "neoverse-n1"


class Target:
    """Where eval.py runs. Subclasses say how to copy a folder there, run an argv there and fetch a file."""

    name = "target"
    python: list[str] = ["python3"]

    def workdir(self, bundle: Path, manifest: dict) -> str:
        """Where the bundle lives on the target."""
        raise NotImplementedError

    def push(self, bundle: Path, remote: str) -> None:
        raise NotImplementedError

    def execute(self, argv: list[str], cwd: str) -> int:
        raise NotImplementedError

    def fetch(self, remote_file: str, local_file: Path) -> None:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        return None


def _run(argv: list[str], what: str, env: dict | None = None, check: bool = True) -> int:
    try:
        rc = subprocess.run(argv, env=env).returncode
    except FileNotFoundError:
        raise UserError(f"{argv[0]}: not found (needed for {what})") from None
    if check and rc != 0:
        raise _Failed(rc, f"{what} failed (exit {rc}): {shlex.join(argv)}")
    return rc


class _Failed(Exception):
    def __init__(self, rc: int, msg: str):
        super().__init__(msg)
        self.rc = rc


class Local(Target):
    """This machine, with this Python (the toolkit's venv has numpy + LiteRT)."""

    name = "local"

    def __init__(self, python: list[str] | None = None):
        self.python = python or [sys.executable]

    def workdir(self, bundle: Path, manifest: dict) -> str:
        return str(bundle)

    def push(self, bundle: Path, remote: str) -> None:
        pass

    def execute(self, argv: list[str], cwd: str) -> int:
        return _run(argv, "eval.py", env=self.env(), check=False)

    def fetch(self, remote_file: str, local_file: Path) -> None:
        if Path(remote_file).resolve() != local_file.resolve():
            shutil.copy2(remote_file, local_file)


class Qemu(Local):
    """Debian aarch64 Python + aarch64 wheels under qemu-user: real ARM code on an x86 machine."""

    def __init__(self, cpu: str = DEFAULT_QEMU_CPU, root: str | None = None, quiet: bool = False):
        qemu = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
        if not qemu:
            raise UserError("qemu-aarch64-static not found: install qemu-user-static (scripts/system-deps.sh)")
        root = root or os.environ.get("GHNQ_ARM_ROOT") or build_arm_root(quiet)
        if not Path(root, "usr/bin/python3.11").is_file():
            raise UserError(f"{root}: not an aarch64 root with usr/bin/python3.11 (see scripts/make_arm_root.sh)")
        self.root, self.cpu, self.name = root, cpu, f"qemu-aarch64-{cpu.replace(',', '-').replace('=', '')}"
        # binfmt_misc is not mounted in containers: call qemu explicitly, with the root as its -L prefix
        # (also where the fake /proc/cpuinfo LiteRT needs is found).
        self.python = [qemu, "-L", root, "-cpu", cpu, str(Path(root, "usr/bin/python3.11"))]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
        env["PYTHONPATH"] = str(Path(self.root, "opt/ghnq-wheels"))
        return env


def build_arm_root(quiet: bool = False) -> str:
    """The cached aarch64 root (scripts/make_arm_root.sh builds it on first use, ~1 min)."""
    script = REPO / "scripts" / "make_arm_root.sh"
    if not quiet:
        print("aarch64 root: scripts/make_arm_root.sh (cached; the first build downloads Debian + wheels)",
              file=sys.stderr)
    proc = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise UserError(f"{script} failed (exit {proc.returncode}); see the messages above")
    return proc.stdout.strip().splitlines()[-1]


class Ssh(Target):
    """A Linux board over ssh: ssh://user@host[:port]."""

    def __init__(self, spec: str, identity: str | None = None, options: list[str] | None = None,
                 python: list[str] | None = None, remote_dir: str | None = None):
        m = re.fullmatch(r"ssh://(?:([^@/:]+)@)?([^@/:]+|\[[0-9a-fA-F:]+\])(?::(\d+))?/?", spec)
        if not m:
            raise UserError(f"--target {spec!r}: expected ssh://user@host[:port]")
        user, host, port = m.group(1), m.group(2), m.group(3) or "22"
        self.dest = f"{user}@{host}" if user else host
        self.name = f"ssh-{self.dest}-{port}".replace("[", "").replace("]", "").replace(":", "_")
        self.python = python or ["python3"]
        self.remote_dir = remote_dir
        opts = ["-p", port, "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5",
                "-o", "ServerAliveCountMax=3"]
        if identity:
            opts += ["-i", identity]
        for o in options or []:
            opts += ["-o", o]
        self.ssh = ["ssh", *opts]
        self.rsync = shutil.which("rsync") is not None

    def workdir(self, bundle: Path, manifest: dict) -> str:
        # relative paths are relative to the remote home (no "~" to expand: everything is quoted)
        return self.remote_dir or f"ghnq-bundles/{manifest['name']}-{_manifest_id(bundle)}"

    def _remote(self, command: str) -> list[str]:
        return [*self.ssh, self.dest, "--", command]

    def push(self, bundle: Path, remote: str) -> None:
        _run(self._remote(shlex.join(["mkdir", "-p", "--", remote])), "ssh mkdir")
        files = [str(p) for p in sorted(bundle.iterdir()) if p.is_file()]
        if self.rsync:
            # -s: the remote path goes to the remote rsync as data, never through its shell
            rc = _run(["rsync", "-a", "--partial", "-s", "-e", shlex.join(self.ssh), *files,
                       f"{self.dest}:{remote}/"], "rsync push", check=False)
            if rc == 0:
                return
            if rc == CONNECTION_LOST:
                raise _Failed(rc, "rsync push: connection lost")
            print(f"rsync failed (exit {rc}); copying with scp instead", file=sys.stderr)
        self._scp([*files, f"{self.dest}:{remote}/"])

    def _scp(self, args: list[str]) -> None:
        # scp speaks SFTP (OpenSSH >= 9): remote paths are not parsed by a shell either
        opts = ["-P" if o == "-p" else o for o in self.ssh[1:]]
        _run(["scp", "-q", *opts, *args], "scp")

    def execute(self, argv: list[str], cwd: str) -> int:
        command = f"{shlex.join(['cd', '--', cwd])} && {shlex.join(argv)}"
        return _run(self._remote(command), "ssh", check=False)

    def fetch(self, remote_file: str, local_file: Path) -> None:
        tmp = local_file.with_name(f".{local_file.name}.part")
        if self.rsync:
            _run(["rsync", "-s", "-e", shlex.join(self.ssh), f"{self.dest}:{remote_file}", str(tmp)], "rsync fetch")
        else:
            self._scp([f"{self.dest}:{remote_file}", str(tmp)])
        os.replace(tmp, local_file)


class Adb(Target):
    """An Android device: adb[:serial], adb push + adb shell."""

    def __init__(self, spec: str, python: list[str] | None = None, remote_dir: str | None = None):
        serial = spec.partition(":")[2]
        self.adb = ["adb", "-s", serial] if serial else ["adb"]
        self.name = f"adb-{serial}" if serial else "adb"
        self.python = python or ["python3"]
        self.remote_dir = remote_dir

    def workdir(self, bundle: Path, manifest: dict) -> str:
        return self.remote_dir or f"/data/local/tmp/ghnq/{manifest['name']}-{_manifest_id(bundle)}"

    def push(self, bundle: Path, remote: str) -> None:
        # `adb shell` joins its arguments into one line for the device's shell: quote them ourselves
        _run([*self.adb, "shell", shlex.join(["mkdir", "-p", "--", remote])], "adb shell mkdir")
        files = [str(p) for p in sorted(bundle.iterdir()) if p.is_file()]
        _run([*self.adb, "push", *files, f"{remote}/"], "adb push")

    def execute(self, argv: list[str], cwd: str) -> int:
        command = f"{shlex.join(['cd', '--', cwd])} && {shlex.join(argv)}"
        return _run([*self.adb, "shell", command], "adb shell", check=False)

    def fetch(self, remote_file: str, local_file: Path) -> None:
        tmp = local_file.with_name(f".{local_file.name}.part")
        _run([*self.adb, "pull", remote_file, str(tmp)], "adb pull")
        os.replace(tmp, local_file)


def _manifest_id(bundle: Path) -> str:
    return sha256_file(bundle / "manifest.json")[:10]


def make_target(spec: str, python: str | None = None, identity: str | None = None,
                ssh_options: list[str] | None = None, remote_dir: str | None = None,
                qemu_cpu: str = DEFAULT_QEMU_CPU, arm_root: str | None = None, quiet: bool = False) -> Target:
    py = shlex.split(python) if python else None
    if spec == "local":
        return Local(py)
    if spec.startswith("ssh://"):
        return Ssh(spec, identity, ssh_options, py, remote_dir)
    if spec == "adb" or spec.startswith("adb:"):
        return Adb(spec, py, remote_dir)
    if spec == "qemu-aarch64":
        return Qemu(qemu_cpu, arm_root, quiet)
    raise UserError(f"--target {spec!r}: expected local, ssh://user@host[:port], adb[:serial] or qemu-aarch64")


def run_bundle(target: Target, bundle: str | Path, eval_args: list[str], out: str | Path | None = None,
               retries: int = 5, results_name: str = "results") -> tuple[int, dict | None, Path]:
    """Check, copy, run and fetch; returns (eval.py exit code, result.json or None, local results folder)."""
    bundle = Path(bundle).resolve()
    manifest = verify_bundle(bundle)  # refuse a tampered bundle before it leaves this machine
    out = Path(out) if out else bundle.parent / "runs" / target.name
    out.mkdir(parents=True, exist_ok=True)
    remote = target.workdir(bundle, manifest)
    if isinstance(target, Local):  # runs in place, writes straight into `out`
        remote_out = str(out.resolve())
        argv = [*target.python, str(bundle / "eval.py"), str(bundle), "--out", remote_out, *eval_args]
    else:  # runs in the copied folder (paths relative to it: the remote home may be anywhere)
        remote_out = f"{remote}/{results_name}"
        argv = [*target.python, "eval.py", ".", "--out", results_name, *eval_args]

    rc = CONNECTION_LOST
    for attempt in range(retries + 1):
        if attempt:
            wait = min(2 ** (attempt - 1), 30)
            print(f"{target.name}: connection lost; retry {attempt}/{retries} in {wait} s (resumes from the saved "
                  f"chunks)", file=sys.stderr)
            time.sleep(wait)
        try:
            target.push(bundle, remote)
            rc = target.execute(argv, remote)
        except _Failed as err:
            if err.rc != CONNECTION_LOST:
                raise UserError(str(err)) from None
            rc = CONNECTION_LOST
        if rc != CONNECTION_LOST:
            break
    if rc == CONNECTION_LOST:
        raise UserError(f"{target.name}: connection lost {retries + 1} times; rerun the same command to resume")
    if rc == 2:
        return rc, None, out  # eval.py refused the bundle or its input; it said why on stderr
    if rc != 0 and rc != 1:
        raise UserError(f"{target.name}: eval.py exited with {rc}; is --python {shlex.join(target.python)!r} a "
                        f"Python 3 with numpy and a runtime (ai-edge-litert / executorch) on the target?")

    try:
        target.fetch(f"{remote_out}/result.json", out / "result.json")
        result = json.loads((out / "result.json").read_text())
        for rec in result["artifacts"].values():
            if "outputs" in rec:
                target.fetch(f"{remote_out}/{rec['outputs']}", out / rec["outputs"])
    except _Failed as err:
        raise UserError(f"{target.name}: fetching results failed: {err}") from None
    if result.get("manifest_sha256") != sha256_file(bundle / "manifest.json"):
        raise UserError(f"{out / 'result.json'}: made from another bundle (manifest sha256 differs)")
    result["target"] = target.name
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return rc, result, out


def add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="local",
                   help="local | ssh://user@host[:port] | adb[:serial] | qemu-aarch64 (default local)")
    p.add_argument("--python", default=None, help="Python command on the target (default python3; local: this one)")
    p.add_argument("-i", "--identity", default=None, help="ssh: private key file")
    p.add_argument("--ssh-option", action="append", default=[], metavar="KEY=VALUE", help="ssh: extra -o option")
    p.add_argument("--remote-dir", default=None, help="ssh/adb: folder on the target for the bundle")
    p.add_argument("--qemu-cpu", default=DEFAULT_QEMU_CPU,
                   help=f"qemu: emulated CPU model (default {DEFAULT_QEMU_CPU}; qemu's own default 'max' miscomputes "
                        "XNNPACK int8)")
    p.add_argument("--arm-root", default=None, help="qemu: aarch64 root (default: scripts/make_arm_root.sh's cache)")
    p.add_argument("--retries", type=int, default=5, help="retries after a dropped connection (default 5)")


def target_from_args(args: argparse.Namespace) -> Target:
    return make_target(args.target, args.python, args.identity, args.ssh_option, args.remote_dir, args.qemu_cpu,
                       args.arm_root, getattr(args, "quiet", False))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devices.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle folder (python -m devices.bundle out/<name>/ makes it)")
    add_target_args(p)
    p.add_argument("--out", default=None, help="local folder for the results (default <bundle>/../runs/<target>)")
    p.add_argument("--threads", type=int, default=1, help="runtime threads on the target (default 1)")
    p.add_argument("--artifact", action="append", default=[], help="artifact to run (repeatable; default all)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--runs", type=int, default=None, help="timed latency runs")
    p.add_argument("--skip-latency", action="store_true", help="accuracy and verification only")
    p.add_argument("--quiet", action="store_true", help="no progress from the target: errors and the result only")
    args = p.parse_args(argv)
    if args.retries < 0 or args.threads < 1:
        raise UserError("--retries must be >= 0 and --threads >= 1")
    eval_args = ["--threads", str(args.threads)]
    for a in args.artifact:
        eval_args += ["--artifact", a]
    if args.limit:
        eval_args += ["--limit", str(args.limit)]
    if args.runs:
        eval_args += ["--runs", str(args.runs)]
    if args.skip_latency:
        eval_args.append("--skip-latency")
    if args.quiet:
        eval_args.append("--quiet")
    target = target_from_args(args)
    rc, result, out = run_bundle(target, args.bundle, eval_args, args.out, args.retries)
    if result is not None:
        print(f"{target.name}: {'verified' if result['verified'] else 'VERIFICATION FAILED'}; "
              f"results in {out / 'result.json'}")
    return rc


if __name__ == "__main__":
    run_cli(main)
