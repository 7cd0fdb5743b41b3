"""The export pipeline every exporter shares: flags, stages, report.

    spec → model → weights → calibration → QuantizedModel → writer → verification → report

An exporter (export/tflite.py, export/executorch.py) supplies only its writer: a function
`build(qm, out_dir, name, args) -> Built` that checks everything it needs from the QM *before* writing (so a
model it cannot express leaves no file), writes its artifacts atomically, and returns the runners that
verification uses. Everything else — flags, weights, calibration images, the `.qm` file, verification,
report.json / report.md / plots and the exit code — is here, once.

Exit codes: 0 verified, 1 written but verification failed its tolerance, 2 bad input (one line, nothing written).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from calibration.qmodel import QuantizedModel
from export.verify import Runners, Tolerance, verify, write_report
from ghnq.cli import UserError
from ghnq.fileio import sha256_file

DEFAULT_OUT = Path("out")
STAGES = ("spec", "model", "weights", "calibration", "write", "verify", "report")


@dataclass
class Built:
    """What an exporter's writer returns: files written and how to run them."""

    artifact: Path  # the int8 artifact (the one verified)
    runners: Runners
    artifacts: dict[str, Path] = field(default_factory=dict)  # every file written, by role ("int8", "fp32", ...)
    info: dict[str, Any] = field(default_factory=dict)  # writer facts for the report (op counts, delegation...)


Build = Callable[[QuantizedModel, Path, str, argparse.Namespace], Built]


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", required=True, metavar="SPEC", help="spec.yaml of the model (see specs/)")
    p.add_argument("--out", metavar="DIR", help=f"output folder (default: {DEFAULT_OUT}/<name>)")
    p.add_argument("--weights", metavar="FILE", help="float weights (state_dict or ghnq.train checkpoint); default: "
                   "the shipped GHN-Q prediction, else a seeded random init with a warning")
    p.add_argument("--method", default="minmax", help="activation observer: minmax, moving_average, percentile, mse")
    p.add_argument("--bits", type=int, default=8, help="weight bits (8, 6, 4, 2; stored in int8); activations are int8")
    p.add_argument("--calib-images", type=int, default=512, metavar="N", help="calibration images (default 512)")
    p.add_argument("--data-root", metavar="DIR", help="CIFAR-10 JPEG root (default: $GHNQ_DATA_ROOT or "
                   "../shared/data/cifar10-jpeg; without one, the embedded 512-image sample is used)")
    p.add_argument("--bn-recalibrate", action=argparse.BooleanOptionalAction, default=None,
                   help="re-estimate BN statistics on the calibration images before folding (default: on for "
                   "predicted or random weights, off for --weights)")
    p.add_argument("--verify-images", type=int, default=1000, metavar="N", help="test images to verify on (1000)")
    p.add_argument("--reference-images", type=int, default=250, metavar="N",
                   help="of those, how many also run through the integer reference and the exact runners (250)")
    p.add_argument("--per-layer", action="store_true", help="also compare every intermediate tensor and plot it")
    p.add_argument("--per-layer-images", type=int, default=100, metavar="N", help="images for --per-layer (100)")
    p.add_argument("--max-step-error", type=int, default=Tolerance.max_steps, metavar="K",
                   help=f"tolerance: every logit within K int8 steps of the sim (default {Tolerance.max_steps})")
    p.add_argument("--min-agreement", type=float, default=Tolerance.min_agreement, metavar="F",
                   help=f"tolerance: top-1 agreement with the sim (default {Tolerance.min_agreement})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init when no weights exist (0)")
    p.add_argument("--threads", type=int, default=1, help="torch / runtime threads (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _check_args(args: argparse.Namespace) -> None:
    from calibration.observers import METHODS

    if args.method not in METHODS:
        raise UserError(f"--method: got {args.method!r}; allowed: {', '.join(METHODS)}")
    if args.bits not in (8, 6, 4, 2):
        raise UserError(f"--bits: got {args.bits}; allowed: 8, 6, 4, 2")
    for flag, v in (("--calib-images", args.calib_images), ("--verify-images", args.verify_images),
                    ("--per-layer-images", args.per_layer_images),
                    ("--reference-images", args.reference_images), ("--threads", args.threads)):
        if v < 1:
            raise UserError(f"{flag}: got {v}; must be ≥ 1")
    if args.max_step_error < 0 or not 0.0 <= args.min_agreement <= 1.0:
        raise UserError("--max-step-error must be ≥ 0 and --min-agreement in [0, 1]")
    if args.data_root is not None and not Path(args.data_root).is_dir():
        raise UserError(f"--data-root {args.data_root}: no such folder")
    if args.weights is not None and not Path(args.weights).is_file():
        raise UserError(f"--weights {args.weights}: no such file")


def run_export(args: argparse.Namespace, fmt: str, build: Build) -> int:
    """All stages for one exporter; returns the exit code (UserError propagates to run_cli → exit 2)."""
    from calibration import calibrate
    from ghnq.data import fit_images, load_eval_images
    from ghnq.spec import build_model, load_spec, spec_name
    from ghnq.weights import obtain_weights

    torch.set_num_threads(args.threads)
    _check_args(args)
    stage = _Stages(f"export.{fmt}", args.quiet)
    stage("spec")
    spec = load_spec(args.arch)
    name = spec_name(spec)
    out_dir = Path(args.out) if args.out else DEFAULT_OUT / name
    stage("model")
    model = build_model(spec)
    stage("weights")
    weights = obtain_weights(model, args.weights, bits=args.bits, seed=args.seed, quiet=args.quiet)
    if weights.startswith("random"):
        print(f"WARNING: {name}: random weights — the exported model predicts at chance level and its "
              "verification tolerance is likely to fail (random layers amplify rounding)", file=sys.stderr)
    stage("calibration")
    bn = args.bn_recalibrate if args.bn_recalibrate is not None else args.weights is None
    calib, _, calib_source = load_eval_images(args.calib_images, args.data_root, split="train", quiet=args.quiet)
    calib = fit_images(calib, spec["input"], f"{args.arch}: input")
    qm = calibrate(model, calib, method=args.method, weight_bits=args.bits, act_bits=8, bn_recalibrate=bn,
                   progress=not args.quiet, meta={"name": name, "weights": weights,
                                                  "calibration_source": calib_source})
    # Load the verification images now: any data problem surfaces before a file is written.
    images, labels, verify_source = load_eval_images(args.verify_images, args.data_root, split="test", quiet=True)
    images = fit_images(images, spec["input"], f"{args.arch}: input")
    stage("write")
    from calibration.qmodel import save

    built = build(qm, out_dir, name, args)  # checks the QM, then writes its artifacts atomically
    qm_path = save(qm, out_dir / f"{name}.qm")
    stage("verify")
    tol = Tolerance(args.max_step_error, args.min_agreement)
    metrics = verify(qm, built.runners, images, labels, out_dir, float_model=model, tol=tol,
                     per_layer=args.per_layer, per_layer_images=args.per_layer_images,
                     reference_images=args.reference_images, quiet=args.quiet)
    stage("report")
    artifacts = {**{k: str(v) for k, v in built.artifacts.items()}, "qm": str(qm_path)}
    report = {
        "name": name, "format": fmt, "artifact": str(built.artifact), "artifacts": artifacts,
        "sha256": {k: sha256_file(v) for k, v in artifacts.items()},
        "size_bytes": {k: Path(v).stat().st_size for k, v in artifacts.items()},
        "weights": weights, "spec": str(args.arch),
        "calibration": {"method": args.method, "weight_bits": args.bits, "images": len(calib),
                        "source": calib_source, "bn_recalibrated": bool(bn)},
        "verify_source": verify_source,
        "quantization": _io_quantization(qm),
        **metrics,
        "writer": built.info,
        "stage_seconds": stage.times,
        "export_seconds": round(sum(stage.times.get(s, 0.0) for s in ("calibration", "write")), 3),
    }
    if "embedded sample" in calib_source and "embedded sample" in verify_source:
        report["note"] = ("no data root: calibration and verification both used the embedded 512-image sample; "
                          "set --data-root for a held-out verification set")
    js, md = write_report(out_dir, report)
    stage.done()
    status = "verified" if report["passed"] else "VERIFICATION FAILED (" + "; ".join(report["failures"]) + ")"
    print(f"{name}: {built.artifact} — {status}: top-1 agreement {report['top1_agreement']:.4f}, max step error "
          f"{report['max_step_error']}, accuracy {report['accuracy_artifact']:.4f} on {report['images']} images\n"
          f"report: {md} ({js.name})")
    return 0 if report["passed"] else 1


class _Stages:
    """One progress bar over the stages; records each stage's wall time."""

    def __init__(self, desc: str, quiet: bool) -> None:
        self.bar = tqdm(total=len(STAGES), desc=desc, unit="stage", disable=quiet, file=sys.stderr)
        self.times: dict[str, float] = {}
        self.current: str | None = None
        self.start = time.perf_counter()

    def __call__(self, name: str | None) -> None:
        now = time.perf_counter()
        if self.current is not None:
            self.times[self.current] = round(now - self.start, 3)
            self.bar.update(1)
        self.current, self.start = name, now
        if name:
            self.bar.set_postfix_str(name)

    def done(self) -> None:
        self(None)
        self.bar.close()


def _io_quantization(qm: QuantizedModel) -> dict[str, dict[str, float]]:
    io = {}
    for key, name in (("input", qm.input), ("output", qm.output)):
        t = qm.tensors[name]
        io[key] = {"scale": float(np.float32(t.scale[0])), "zero_point": int(t.zero_point[0])}
    return io
