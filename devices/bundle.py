"""Pack an export folder into a device bundle: artifacts + int8 eval data + the sim's expected outputs.

    python -m devices.bundle out/<name>/          # → out/<name>/bundle/ and out/<name>/bundle.tar.gz

What the exporter writes (the contract this module reads), in `out/<name>/`:
    <name>_int8.tflite          int8 input and output (required: at least one artifact)
    <name>_fp32.tflite          optional float twin (benchmarks; reported, never held to int8 tolerance)
    <name>_xnnpack.pte          optional ExecuTorch artifact (int8 I/O, or float I/O converted by eval.py)
    report.json                 optional; copied as export_report.json, merged by `devices.report`
    verify/inputs_int8.npy      int8 [N, H, W, C]: eval images already quantized with the model's input
                                quantization (which folds the CIFAR normalization); NHWC like TFLite, eval.py
                                transposes for NCHW artifacts
    verify/expected_int8.npy    int8 [N, classes]: the fake-quant sim's output codes for those inputs
    verify/labels.npy           integer [N]: the true labels
    verify/quantization.json    optional {"input": {"scale", "zero_point"}, "output": {...}}; else taken from
                                report.json's "quantization" key, else from the int8 .tflite's I/O tensors
Every `*.tflite` / `*.pte` in the folder is an artifact; a stem ending in `_fp32` is float, any other is int8.

The bundle (`bundle/`): those artifacts, inputs_int8.npy, expected_int8.npy, labels.npy, export_report.json,
eval.py (devices/ondevice/eval.py, everything a device runs) and manifest.json: the sha256 and size of every
other file, the artifacts and their precision, the input/output quantization, data shapes, the verification
tolerance and the toolkit's versions. devices.run and eval.py both refuse a bundle whose files do not match.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np

from ghnq.cli import UserError, run_cli
from ghnq.fileio import atomic_write, atomic_write_text, sha256_file

EVAL_SCRIPT = Path(__file__).resolve().parent / "ondevice" / "eval.py"
BUNDLE_FORMAT = "ghnq-bundle/1"
VERIFY_FILES = {"inputs": "inputs_int8.npy", "expected": "expected_int8.npy", "labels": "labels.npy"}
# Sim vs device is a rounding difference when both carry one set of parameters (DESIGN.md: ≤ 1–2 steps).
DEFAULT_MAX_STEP_ERROR = 2
DEFAULT_MIN_TOP1_AGREEMENT = 0.99


def _toolkit_versions() -> dict:
    import ghnq

    versions = {"ghnq": ghnq.__version__, "numpy": np.__version__}
    try:
        import ai_edge_litert

        versions["ai_edge_litert"] = getattr(ai_edge_litert, "__version__", "?")
    except ImportError:
        pass
    return versions


def _load_array(path: Path, ndim: int, int8: bool) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"{path}: missing (the exporter writes it; see `python -m devices.bundle --help`)")
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable .npy file ({err})") from None
    if a.ndim != ndim or (a.dtype != np.int8 if int8 else a.dtype.kind not in "iu"):
        raise UserError(f"{path}: expected a {ndim}-D {'int8' if int8 else 'integer'} array, got {a.ndim}-D {a.dtype}")
    return a


def _tflite_io_quantization(path: Path) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    try:
        it = Interpreter(model_path=str(path))
    except (ValueError, RuntimeError) as err:
        raise UserError(f"{path}: LiteRT cannot load it ({err})") from None
    q = {}
    for side, det in (("input", it.get_input_details()), ("output", it.get_output_details())):
        if len(det) != 1 or det[0]["dtype"] != np.int8:
            raise UserError(f"{path}: an int8 artifact needs one int8 {side}, got "
                            f"{[str(np.dtype(d['dtype'])) for d in det]}")
        scale, zp = det[0]["quantization"]
        q[side] = {"scale": float(scale), "zero_point": int(zp)}
    return q


def _quantization(export: Path, artifacts: list[dict], report: dict | None) -> dict:
    """The input/output quantization, from every source present; they must agree."""
    sources: dict[str, dict] = {}
    qfile = export / "verify" / "quantization.json"
    if qfile.is_file():
        sources[str(qfile)] = json.loads(qfile.read_text())
    if report and "quantization" in report:
        sources[f"{export / 'report.json'} key 'quantization'"] = report["quantization"]
    for a in artifacts:
        if a["precision"] == "int8" and a["file"].endswith(".tflite"):
            sources[str(export / a["file"])] = _tflite_io_quantization(export / a["file"])
    if not sources:
        raise UserError(f"{export}: no input/output quantization found (write verify/quantization.json)")
    first_name, first = next(iter(sources.items()))
    for name, q in sources.items():
        for side in ("input", "output"):
            try:
                s, z = float(q[side]["scale"]), int(q[side]["zero_point"])
            except (KeyError, TypeError, ValueError):
                raise UserError(f"{name}: needs {side}.scale and {side}.zero_point") from None
            s0, z0 = float(first[side]["scale"]), int(first[side]["zero_point"])
            if z != z0 or abs(s - s0) > 1e-6 * abs(s0):
                raise UserError(f"{side} quantization differs: {name} has (scale {s}, zero point {z}), "
                                f"{first_name} has (scale {s0}, zero point {z0})")
    return {side: {"scale": float(first[side]["scale"]), "zero_point": int(first[side]["zero_point"]),
                   "dtype": "int8"} for side in ("input", "output")}


def make_bundle(export: str | Path, max_step_error: int | None = None,
                min_top1_agreement: float | None = None) -> Path:
    """Write `export/bundle/` and `export/bundle.tar.gz`; returns the bundle folder.

    The tolerance is the one given, else the export's own (report.json "tolerance"), else the defaults.
    """
    export = Path(export)
    if not export.is_dir():
        raise UserError(f"{export}: not a folder (give the export folder, e.g. out/<name>/)")
    files = sorted(p for p in export.iterdir() if p.is_file() and p.suffix in (".tflite", ".pte"))
    if not files:
        raise UserError(f"{export}: no .tflite or .pte artifact (run python -m export.tflite first)")
    artifacts = [{"file": p.name, "format": p.suffix[1:],
                  "precision": "fp32" if p.stem.endswith("_fp32") else "int8"} for p in files]
    if not any(a["precision"] == "int8" for a in artifacts):
        raise UserError(f"{export}: no int8 artifact (only {', '.join(p.name for p in files)})")

    verify = export / "verify"
    inputs = _load_array(verify / VERIFY_FILES["inputs"], 4, int8=True)
    expected = _load_array(verify / VERIFY_FILES["expected"], 2, int8=True)
    labels = _load_array(verify / VERIFY_FILES["labels"], 1, int8=False)
    if not len(inputs) == len(expected) == len(labels):
        raise UserError(f"{verify}: inputs, expected outputs and labels have different lengths "
                        f"({len(inputs)}, {len(expected)}, {len(labels)})")
    report_path = export / "report.json"
    report = None
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text())
        except ValueError as err:
            raise UserError(f"{report_path}: not valid JSON ({err})") from None
    quant = _quantization(export, artifacts, report)
    tol = (report or {}).get("tolerance") or {}
    if max_step_error is None:
        max_step_error = tol.get("max_step_error", DEFAULT_MAX_STEP_ERROR)
    if min_top1_agreement is None:
        min_top1_agreement = tol.get("min_top1_agreement", DEFAULT_MIN_TOP1_AGREEMENT)

    # Build beside the final folder and swap it in: a killed run never leaves a half bundle.
    bundle = export / "bundle"
    tmp = export / f".bundle.{time.time_ns()}.tmp"
    tmp.mkdir()
    try:
        for p in files:
            shutil.copy2(p, tmp / p.name)
        for name in VERIFY_FILES.values():
            shutil.copy2(verify / name, tmp / name)
        if report is not None:
            shutil.copy2(report_path, tmp / "export_report.json")
        shutil.copy2(EVAL_SCRIPT, tmp / "eval.py")
        manifest = {
            "format": BUNDLE_FORMAT,
            "name": export.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "toolkit": _toolkit_versions(),
            "artifacts": artifacts,
            "data": {**VERIFY_FILES, "count": int(len(labels)), "input_shape": list(inputs.shape[1:]),
                     "input_layout": "NHWC", "classes": int(expected.shape[1])},
            "quantization": quant,
            "tolerance": {"max_step_error": int(max_step_error), "min_top1_agreement": float(min_top1_agreement)},
            "files": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                      for p in sorted(tmp.iterdir())},
        }
        atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        old = export / f".bundle.{time.time_ns()}.old"
        if bundle.exists():
            bundle.rename(old)
        tmp.rename(bundle)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write(export / "bundle.tar.gz", lambda f: _tar(bundle, f))
    return bundle


def _tar(bundle: Path, f: io.BufferedWriter) -> None:
    with tarfile.open(fileobj=f, mode="w:gz") as tar:
        for p in sorted(bundle.iterdir()):
            tar.add(p, arcname=f"bundle/{p.name}")


def verify_bundle(bundle: str | Path) -> dict:
    """Host-side check before anything is copied: the same sha256 check eval.py does on the device."""
    from devices.ondevice import eval as ondevice

    bundle = Path(bundle)
    if not bundle.is_dir():
        raise UserError(f"{bundle}: not a bundle folder (make one with python -m devices.bundle out/<name>/)")
    try:
        manifest = ondevice.load_manifest(str(bundle))
        ondevice.verify_bundle(str(bundle), manifest)
    except ondevice.BundleError as err:
        raise UserError(str(err)) from None
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devices.bundle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", help="export folder, e.g. out/<name>/")
    p.add_argument("--max-step-error", type=int, default=None,
                   help="largest allowed |device - sim| logit error in int8 steps (default: the export's "
                        f"report.json tolerance, else {DEFAULT_MAX_STEP_ERROR})")
    p.add_argument("--min-top1-agreement", type=float, default=None,
                   help="smallest allowed device/sim top-1 agreement (default: the export's, else "
                        f"{DEFAULT_MIN_TOP1_AGREEMENT})")
    args = p.parse_args(argv)
    if (args.max_step_error is not None and args.max_step_error < 0) or (
            args.min_top1_agreement is not None and not 0.0 <= args.min_top1_agreement <= 1.0):
        raise UserError("--max-step-error must be >= 0 and --min-top1-agreement in [0, 1]")
    bundle = make_bundle(args.export, args.max_step_error, args.min_top1_agreement)
    manifest = json.loads((bundle / "manifest.json").read_text())
    tol = manifest["tolerance"]
    print(f"bundle: {bundle} ({len(manifest['files'])} files, {manifest['data']['count']} images, "
          f"artifacts: {', '.join(a['file'] for a in manifest['artifacts'])}; tolerance: max "
          f"{tol['max_step_error']} steps, top-1 agreement >= {tol['min_top1_agreement']}) "
          f"and {bundle.parent / 'bundle.tar.gz'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
