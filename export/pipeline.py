"""The export pipeline every exporter shares: flags, stages, report.

    spec → model → weights → calibration → QuantizedModel → writer → verification → report
                                  a .qm file (--qm) ┘

An exporter (export/tflite.py, export/executorch.py) supplies only its writer: a function
`build(qm, out_dir, name, args) -> Built` that checks everything it needs from the QM *before* writing (so a
model it cannot express leaves no file), writes its artifacts atomically, and returns the runners that
verification uses. Everything else — flags, weights, calibration images, the `.qm` file, verification,
report.json / report.md / plots and the exit code — is here, once.

Exit codes: 0 verified, 1 written but verification failed its tolerance, 2 bad input (one line, nothing written).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from calibration.qmodel import WEIGHTED_OPS, QuantizedModel
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


# Calibration flags default to None on the command line so that --qm can tell they were given; these fill in.
CALIBRATION_DEFAULTS = {"method": "minmax", "bits": 8, "calib_images": 512}


def add_common_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--arch", metavar="SPEC", help="spec.yaml of the model (see specs/)")
    src.add_argument("--qm", metavar="FILE", help="export this QuantizedModel as it is (from python -m calibration, "
                     "ghnq.evolve, ...): no weights, no calibration; its scales, zero points and codes are written")
    p.add_argument("--out", metavar="DIR", help=f"output folder (default: {DEFAULT_OUT}/<name>)")
    p.add_argument("--weights", metavar="FILE", help="float weights (state_dict or ghnq.train checkpoint); default: "
                   "the shipped GHN-Q prediction, else a seeded random init with a warning")
    p.add_argument("--method", help="activation observer: minmax, moving_average, percentile, mse (default minmax)")
    p.add_argument("--bits", type=int, help="weight bits (8, 6, 4, 2; stored in int8; default 8); activations are int8")
    p.add_argument("--calib-images", type=int, metavar="N", help="calibration images (default 512)")
    p.add_argument("--data-root", metavar="DIR", help="CIFAR-10 JPEG root (default: $GHNQ_DATA_ROOT or "
                   "../shared/data/cifar10-jpeg; without one, the embedded 512-image sample is used)")
    p.add_argument("--bn-recalibrate", action=argparse.BooleanOptionalAction, default=None,
                   help="re-estimate BN statistics on the calibration images before folding (default: when "
                   "they are placeholders, mean 0 / variance 1, as with predicted or random weights)")
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

    given = [k for k in (*CALIBRATION_DEFAULTS, "weights", "bn_recalibrate") if getattr(args, k) is not None]
    if args.qm is not None and given:
        flag = "--" + given[0].replace("_", "-")
        raise UserError(f"{flag}: not used with --qm (the QuantizedModel already fixes its weights and every scale "
                        "and zero point); export it as it is, or calibrate again from --arch")
    for k, v in CALIBRATION_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
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
    if args.qm is not None and not Path(args.qm).is_file():
        raise UserError(f"--qm {args.qm}: no such file")


@dataclass
class Source:
    """Where the exported QuantizedModel came from, for verification and the report."""

    qm: QuantizedModel
    name: str
    input_chw: list[int]  # the images verification feeds it, resized to this
    where: str  # file that declares the input (named in errors)
    weights: str
    calibration: dict[str, Any]
    float_model: torch.nn.Module | None  # for the float accuracy; a .qm alone carries no float weights


def calibrated_source(args: argparse.Namespace, stage: _Stages) -> Source:
    """--arch: spec → model → weights → calibration."""
    from calibration import calibrate
    from ghnq.data import fit_images, load_eval_images
    from ghnq.spec import build_model, load_spec, spec_name
    from ghnq.weights import obtain_weights

    stage("spec")
    spec = load_spec(args.arch)
    name = spec_name(spec)
    stage("model")
    model = build_model(spec)
    stage("weights")
    weights = obtain_weights(model, args.weights, bits=args.bits, seed=args.seed, quiet=args.quiet)
    if weights.startswith("random"):
        print(f"WARNING: {name}: random weights — the exported model predicts at chance level and its "
              "verification tolerance is likely to fail (random layers amplify rounding)", file=sys.stderr)
    stage("calibration")
    calib, _, calib_source = load_eval_images(args.calib_images, args.data_root, split="train", quiet=args.quiet)
    calib = fit_images(calib, spec["input"], f"{args.arch}: input")
    qm = calibrate(model, calib, method=args.method, weight_bits=args.bits, act_bits=8,
                   bn_recalibrate=args.bn_recalibrate, progress=not args.quiet,
                   meta={"name": name, "weights": weights, "calibration_source": calib_source})
    return Source(qm, name, spec["input"], f"{args.arch}: input", weights,
                  {"method": args.method, "weight_bits": args.bits, "images": len(calib), "source": calib_source,
                   "bn_recalibrated": bool(qm.meta["bn_recalibrated"])}, model)


def file_source(args: argparse.Namespace, stage: _Stages) -> Source:
    """--qm: a QuantizedModel file, exported as it is."""
    from calibration.qmodel import load
    from ghnq.data import check_channels
    from ghnq.spec import NAME_RE, spec_name

    stage("spec")
    qm = load(args.qm)  # checks its sha256 and structure
    stage.skip("model", "weights", "calibration")
    meta = qm.meta
    name = meta.get("name") or (spec_name(meta["spec"]) if isinstance(meta.get("spec"), dict) else "")
    name = name if NAME_RE.match(str(name)) else Path(args.qm).stem
    if not NAME_RE.match(name):
        name = "model"
    shape = list(qm.tensors[qm.input].shape)  # NHWC
    if len(shape) != 4:
        raise UserError(f"{args.qm}: input tensor of shape {shape}; allowed: an image input [1, H, W, 3]")
    check_channels(shape[3], f"{args.qm}: input")
    return Source(qm, name, [shape[3], shape[1], shape[2]], f"{args.qm}: input", str(meta.get("weights", "?")),
                  {"method": meta.get("method"), "weight_bits": meta.get("weight_bits"),
                   "images": meta.get("calibration_images"), "source": meta.get("calibration_source"),
                   "bn_recalibrated": meta.get("bn_recalibrated"), "from": str(args.qm)}, None)


def run_export(args: argparse.Namespace, fmt: str, build: Build) -> int:
    """All stages for one exporter; returns the exit code (UserError propagates to run_cli → exit 2)."""
    from calibration.qmodel import save
    from ghnq.data import CLASSES, fit_images, load_eval_images

    torch.set_num_threads(args.threads)
    _check_args(args)
    stage = _Stages(f"export.{fmt}", args.quiet)
    src = file_source(args, stage) if args.qm is not None else calibrated_source(args, stage)
    qm, name = src.qm, src.name
    out_dir = Path(args.out) if args.out else DEFAULT_OUT / name
    # Load the verification images now: any data problem surfaces before a file is written.
    images, labels, verify_source = load_eval_images(args.verify_images, args.data_root, split="test", quiet=True)
    images = fit_images(images, src.input_chw, src.where)
    stage("write")
    built = build(qm, out_dir, name, args)  # checks the QM, then writes its artifacts atomically
    qm_path = save(qm, out_dir / f"{name}.qm")
    stage("verify")
    tol = Tolerance(args.max_step_error, args.min_agreement)
    metrics = verify(qm, built.runners, images, labels, out_dir, float_model=src.float_model, tol=tol,
                     per_layer=args.per_layer, per_layer_images=args.per_layer_images,
                     reference_images=args.reference_images, quiet=args.quiet)
    stage("report")
    artifacts = {**{k: str(v) for k, v in built.artifacts.items()}, "qm": str(qm_path)}
    report = {
        "name": name, "format": fmt, "artifact": str(built.artifact), "artifacts": artifacts,
        "sha256": {k: sha256_file(v) for k, v in artifacts.items()},
        "size_bytes": {k: Path(v).stat().st_size for k, v in artifacts.items()},
        "weights": src.weights, "spec": str(args.arch or args.qm),
        "calibration": src.calibration,
        "verify_source": verify_source,
        "quantization": _io_quantization(qm),
        **metrics,
        "writer": built.info,
        "stage_seconds": stage.times,
        "export_seconds": round(sum(stage.times.get(s, 0.0) for s in ("calibration", "write")), 3),
    }
    notes = []
    if "embedded sample" in str(src.calibration["source"]) and "embedded sample" in verify_source:
        notes.append("no data root: calibration and verification both used the embedded 512-image sample; "
                     "set --data-root for a held-out verification set")
    n_out = qm.tensors[qm.output].shape[-1]
    if n_out < len(CLASSES):
        notes.append(f"the model has {n_out} outputs and CIFAR-10 {len(CLASSES)} classes: accuracy counts "
                     f"labels {n_out}–{len(CLASSES) - 1} as misses; top-1 agreement and step errors verify the "
                     "artifact all the same")
    if notes:
        report["notes"] = notes
    js, md = write_report(out_dir, report)
    stage.done()
    status = "verified" if report["passed"] else "VERIFICATION FAILED (" + "; ".join(report["failures"]) + ")"
    print(f"{name}: {built.artifact} — {status}: top-1 agreement {report['top1_agreement']:.4f}, max step error "
          f"{report['max_step_error']}, accuracy {report['accuracy_artifact']:.4f} on {report['images']} images\n"
          f"report: {md} ({js.name})")
    return 0 if report["passed"] else 1


# XNNPACK's int8 convolution / fully-connected operators refuse a requantization scale
# s_in · s_w[c] / s_out ≥ 256 (xnn_create_convolution2d_nhwc_qs8_qc8w, ..._fully_connected_nc_qs8_qc8w), and
# both LiteRT's default delegate and ExecuTorch's XNNPACK backend run them: such a model would not load.
XNNPACK_MAX_REQUANT_SCALE = 256.0


def check_requantization(qm: QuantizedModel) -> None:
    """Refuse, before anything is written, a QM whose weighted ops XNNPACK cannot load, naming the op
    (both writers' check_supported call it)."""
    for i, op in enumerate(qm.ops):
        if op.kind not in WEIGHTED_OPS:
            continue
        s_in = float(qm.tensors[op.inputs[0]].scale[0])
        s_w = np.asarray(qm.tensors[op.inputs[1]].scale, dtype=np.float64)
        s_out = float(qm.tensors[op.outputs[0]].scale[0])
        ratio = s_in * s_w / s_out
        if ratio.max() >= XNNPACK_MAX_REQUANT_SCALE:
            c = int(ratio.argmax())
            raise UserError(
                f"op {i} ({op.kind} → {op.outputs[0]}): requantization scale {ratio[c]:.4g} (input scale "
                f"{s_in:.4g} × weight scale {s_w[c]:.4g} / output scale {s_out:.4g}, channel {c}); XNNPACK's int8 "
                f"kernels allow < {XNNPACK_MAX_REQUANT_SCALE:g}. Activation ranges this wide usually mean BN "
                "statistics that do not fit the weights: calibrate with BN re-estimation (--bn-recalibrate)")


@contextlib.contextmanager
def runtime_refusal(runtime: str) -> Iterator[None]:
    """A runtime that will not load an artifact built from a valid QM: one clear error, and no file written."""
    try:
        yield
    except RuntimeError as err:
        first = " ".join(str(err).split())[:300]
        raise UserError(f"{runtime} refused the artifact ({first}); nothing was written") from None


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

    def skip(self, *names: str) -> None:
        """Stages this run does not have (--qm: no model, weights or calibration)."""
        self(None)
        self.bar.update(len(names))

    def done(self) -> None:
        self(None)
        self.bar.close()


def _io_quantization(qm: QuantizedModel) -> dict[str, dict[str, float]]:
    io = {}
    for key, name in (("input", qm.input), ("output", qm.output)):
        t = qm.tensors[name]
        io[key] = {"scale": float(np.float32(t.scale[0])), "zero_point": int(t.zero_point[0])}
    return io
