"""Bundle, on-device eval.py and the local runner, on a real int8 .tflite (tests/test_devices_common.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from devices.bundle import make_bundle
from ghnq.fileio import sha256_file
from tests.test_devices_common import NAME, copy_export

ROOT = Path(__file__).resolve().parents[1]


def _py(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd or ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    out = copy_export(tmp_path_factory.mktemp("bundle") / NAME)
    r = _py("-m", "devices.bundle", str(out))
    assert r.returncode == 0, r.stderr
    return out


def test_manifest_lists_every_file_with_its_sha256_and_the_quantization(export: Path):
    from ai_edge_litert.interpreter import Interpreter

    bundle = export / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    on_disk = {p.name for p in bundle.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert {"eval.py", f"{NAME}_int8.tflite", f"{NAME}_fp32.tflite", "inputs_int8.npy", "expected_int8.npy",
            "labels.npy", "export_report.json"} == on_disk
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(bundle / name)
    it = Interpreter(model_path=str(bundle / f"{NAME}_int8.tflite"))
    s_in, z_in = it.get_input_details()[0]["quantization"]
    s_out, z_out = it.get_output_details()[0]["quantization"]
    assert manifest["quantization"]["input"] == {"scale": pytest.approx(s_in), "zero_point": z_in, "dtype": "int8"}
    assert manifest["quantization"]["output"] == {"scale": pytest.approx(s_out), "zero_point": z_out, "dtype": "int8"}
    assert {a["file"]: a["precision"] for a in manifest["artifacts"]} == {
        f"{NAME}_int8.tflite": "int8", f"{NAME}_fp32.tflite": "fp32"}
    assert manifest["toolkit"]["ai_edge_litert"] and manifest["toolkit"]["ghnq"]
    with tarfile.open(export / "bundle.tar.gz") as tar:
        names = sorted(m.name for m in tar.getmembers())
    assert names == sorted(f"bundle/{n}" for n in [*on_disk, "manifest.json"])
    # the eval data are the exporter's, byte for byte
    np.testing.assert_array_equal(np.load(bundle / "expected_int8.npy"), np.load(export / "verify/expected_int8.npy"))


def test_local_run_verifies_against_the_expected_outputs(export: Path, tmp_path: Path):
    r = _py("-m", "devices.run", "--target", "local", str(export / "bundle"), "--out", str(tmp_path), "--runs", "5")
    assert r.returncode == 0, r.stderr
    assert "local: verified" in r.stdout
    result = json.loads((tmp_path / "result.json").read_text())
    rec = result["artifacts"][f"{NAME}_int8.tflite"]
    expected = np.load(export / "verify/expected_int8.npy")
    outputs = np.load(tmp_path / rec["outputs"])
    assert outputs.shape == expected.shape and outputs.dtype == np.int8
    # XNNPACK vs the reference kernels: rounding differences of at most one step (EXPORT-NOTES.md)
    assert rec["max_step_error"] == int(np.abs(outputs.astype(int) - expected).max()) <= 1
    assert rec["top1_agreement"] == pytest.approx(np.mean(outputs.argmax(1) == expected.argmax(1)))
    labels = np.load(export / "verify/labels.npy")
    assert rec["accuracy"] == pytest.approx(np.mean(outputs.argmax(1) == labels))
    assert rec["accuracy"] > 0.2  # a trained model, not noise
    lat = rec["latency_ms"]
    assert lat["runs"] == 5 and 0 < lat["min"] <= lat["median"] <= lat["p90"]
    assert result["verified"] and result["failures"] == []
    fp32 = result["artifacts"][f"{NAME}_fp32.tflite"]
    assert fp32["precision"] == "fp32" and abs(fp32["accuracy"] - rec["accuracy"]) < 0.05


def test_quiet_local_run_prints_only_the_result(export: Path, tmp_path: Path):
    """--quiet: no progress from eval.py and no runtime chatter (LiteRT's delegate banner): one result line."""
    r = _py("-m", "devices.run", "--target", "local", str(export / "bundle"), "--out", str(tmp_path), "--runs", "2",
            "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and r.stdout == f"local: verified; results in {tmp_path / 'result.json'}\n", r.stderr
    assert json.loads((tmp_path / "result.json").read_text())["verified"]


def test_eval_resumes_from_saved_chunks(export: Path, tmp_path: Path):
    bundle = export / "bundle"
    args = ["--artifact", f"{NAME}_int8.tflite", "--skip-latency", "--out", str(tmp_path), "--chunk", "100"]
    r = _py(str(bundle / "eval.py"), str(bundle), *args)
    assert r.returncode == 0, r.stderr
    first = np.load(tmp_path / f"{NAME}_int8.tflite.outputs.npy")
    chunks = sorted(tmp_path.glob("chunks/*/*.npy"))
    assert len(chunks) == 10
    for c in chunks[4:]:  # as if the run had been killed after 4 chunks
        c.unlink()
    (tmp_path / "result.json").unlink()
    r = _py(str(bundle / "eval.py"), str(bundle), *args)
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "result.json").read_text())["artifacts"][f"{NAME}_int8.tflite"]
    assert (rec["resumed_chunks"], rec["chunks"], rec["images"]) == (4, 10, 1000)
    np.testing.assert_array_equal(np.load(tmp_path / f"{NAME}_int8.tflite.outputs.npy"), first)
    assert "4 chunks resumed" in r.stderr


@pytest.mark.parametrize("victim", [f"{NAME}_int8.tflite", "expected_int8.npy", "eval.py"])
def test_tampered_bundle_is_refused_on_both_sides_naming_the_file(export: Path, tmp_path: Path, victim: str):
    import shutil

    bundle = Path(shutil.copytree(export / "bundle", tmp_path / "bundle"))
    data = bytearray((bundle / victim).read_bytes())
    if victim == "eval.py":  # still valid Python: the script must notice that it is not the bundled one
        data += b"\nprint('a modified script')\n"
    else:
        data[len(data) // 2] ^= 0x01
    (bundle / victim).write_bytes(bytes(data))
    # host side: devices.run refuses before copying anything
    r = _py("-m", "devices.run", "--target", "local", str(bundle), "--out", str(tmp_path / "res"))
    assert r.returncode == 2
    assert f"bundle file '{victim}' fails its sha256 check" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "res" / "result.json").exists()
    # device side: eval.py refuses on its own (a bundle copied by hand)
    r = _py(str(bundle / "eval.py"), str(bundle), "--out", str(tmp_path / "res2"))
    assert r.returncode == 2
    assert f"bundle file '{victim}' fails its sha256 check" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "res2" / "result.json").exists()


def test_missing_bundle_file_is_refused(export: Path, tmp_path: Path):
    import shutil

    bundle = Path(shutil.copytree(export / "bundle", tmp_path / "bundle"))
    (bundle / "labels.npy").unlink()
    r = _py(str(bundle / "eval.py"), str(bundle))
    assert r.returncode == 2 and "bundle file 'labels.npy' is missing" in r.stderr


def test_bundle_bad_export_folders_are_one_line_errors(export: Path, tmp_path: Path):
    import shutil

    broken = Path(shutil.copytree(export, tmp_path / "x", ignore=shutil.ignore_patterns("bundle*")))
    (broken / "verify" / "expected_int8.npy").unlink()
    r = _py("-m", "devices.bundle", str(broken))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "verify/expected_int8.npy: missing" in r.stderr
    assert not (broken / "bundle").exists()
    np.save(broken / "verify" / "expected_int8.npy", np.zeros((3, 10), np.float32))
    r = _py("-m", "devices.bundle", str(broken))
    assert r.returncode == 2 and "expected a 2-D int8 array, got 2-D float32" in r.stderr
    r = _py("-m", "devices.bundle", str(tmp_path / "nope"))
    assert r.returncode == 2 and "not a folder" in r.stderr


def test_quantization_sources_must_agree(export: Path, tmp_path: Path):
    import shutil

    from ghnq.cli import UserError

    other = Path(shutil.copytree(export, tmp_path / "y", ignore=shutil.ignore_patterns("bundle*")))
    (other / "verify" / "quantization.json").write_text(json.dumps(
        {"input": {"scale": 0.5, "zero_point": 0}, "output": {"scale": 0.25, "zero_point": 3}}))
    with pytest.raises(UserError, match="input quantization differs"):
        make_bundle(other)


def test_int8_artifact_with_other_quantization_fails_verification(export: Path, tmp_path: Path):
    """The device must run the parameters the sim used: a bundle claiming other ones is caught."""
    import shutil

    bundle = Path(shutil.copytree(export / "bundle", tmp_path / "bundle"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["quantization"]["output"]["zero_point"] += 1
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    r = _py(str(bundle / "eval.py"), str(bundle), "--artifact", f"{NAME}_int8.tflite", "--skip-latency",
            "--limit", "50")
    assert r.returncode == 1
    assert f"{NAME}_int8.tflite: output quantization" in r.stderr and "differs from the bundle's" in r.stderr


def test_eval_help_and_bad_arguments():
    script = ROOT / "devices" / "ondevice" / "eval.py"
    r = _py(str(script), "--help")
    assert r.returncode == 0 and "--threads" in r.stdout and "--artifact" in r.stdout
    r = _py(str(script), "/nonexistent-bundle")
    assert r.returncode == 2 and "no manifest.json" in r.stderr and "Traceback" not in r.stderr
    # eval.py runs on devices: at module level it imports the standard library and numpy, nothing else
    # (the runtime is imported by the class that needs it)
    top = {line.split()[1].split(".")[0] for line in script.read_text().splitlines()
           if line.startswith(("import ", "from "))}
    assert top <= {"__future__", "argparse", "contextlib", "hashlib", "json", "os", "platform", "sys", "tempfile",
                   "time", "numpy"}, top


def test_report_and_bench(export: Path, tmp_path: Path):
    r = _py("-m", "devices.run", "--target", "local", str(export / "bundle"), "--runs", "5")
    assert r.returncode == 0, r.stderr
    r = _py("-m", "devices.report", str(export), "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "rep.md").read_text()
    row = next(line for line in md.splitlines() if f"{NAME}_int8.tflite" in line and "local" in line)
    result = json.loads((export / "runs" / "local" / "result.json").read_text())
    rec = result["artifacts"][f"{NAME}_int8.tflite"]
    report = json.loads((export / "report.json").read_text())
    assert f"| {100 * rec['accuracy']:.2f} |" in row and f"| {100 * report['accuracy_sim']:.2f} |" in row
    assert row.rstrip().endswith("| yes |")
    assert (tmp_path / "rep.png").read_bytes()[:4] == b"\x89PNG"

    r = _py("-m", "devices.bench", "--target", "local", "--threads", "1,2", "--runs", "5", "--warmup", "1",
            str(export / "bundle"), "--out", str(tmp_path / "bench"))
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "bench" / "bench.json").read_text())["rows"]
    assert [(r["artifact"], r["threads"]) for r in rows] == [
        (f"{NAME}_fp32.tflite", 1), (f"{NAME}_fp32.tflite", 2), (f"{NAME}_int8.tflite", 1), (f"{NAME}_int8.tflite", 2)]
    assert all(r["latency_ms"]["runs"] == 5 and r["latency_ms"]["median"] > 0 for r in rows)
    assert (tmp_path / "bench" / "bench.png").read_bytes()[:4] == b"\x89PNG"
    r = _py("-m", "devices.bench", "--threads", "0,x", str(export / "bundle"))
    assert r.returncode == 2 and "--threads" in r.stderr


def test_tolerance_comes_from_the_export_report_unless_given(export: Path, tmp_path: Path):
    import shutil

    other = Path(shutil.copytree(export, tmp_path / "z", ignore=shutil.ignore_patterns("bundle*")))
    report = json.loads((other / "report.json").read_text())
    report["tolerance"] = {"max_step_error": 1, "min_top1_agreement": 0.999}
    (other / "report.json").write_text(json.dumps(report))
    tol = json.loads((make_bundle(other) / "manifest.json").read_text())["tolerance"]
    assert tol == {"max_step_error": 1, "min_top1_agreement": 0.999}
    tol = json.loads((make_bundle(other, 3, 0.5) / "manifest.json").read_text())["tolerance"]
    assert tol == {"max_step_error": 3, "min_top1_agreement": 0.5}
