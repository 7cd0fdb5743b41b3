"""One command from a spec to a verified device result, with the accuracy after every stage.

    python -m ghnq.pipeline --arch specs/resnet20.yaml --bits 4 --budget-evals 2000
    python -m ghnq.pipeline --arch specs/resnet20.yaml --bits 4 --target qemu-aarch64 --formats tflite,executorch
    (the same command again resumes a stopped run from its last finished stage)

Stages, in order; each one's output is kept in OUT/<n>-<stage>/ with a stage.json written last (atomically):
  1 predict   GHN-Q predicts the float weights for --bits (ghnq.weights; --weights FILE uses yours instead),
              BN statistics are re-estimated on --calib-images training images. Accuracy: float top-1.
  2 quantize  calibration.calibrate fixes every scale and zero point once (weights --bits, activations int8)
              → <name>.qm. Accuracy: top-1 of the fake-quant simulation.
  3 refine    only when --bits < 8: ghnq.evolve (cooperative-coevolution EA) searches the low-bit integer
              weights for --budget-evals fitness evaluations, starting from stage 2's .qm (its scales stay);
              a killed search resumes from its own checkpoint. Accuracy: sim top-1 of the refined .qm.
  4 export    export.tflite / export.executorch write each --formats artifact of the final .qm (exactly its
              numbers): int8 .tflite / XNNPACK .pte, plus fp32 twins.
  5 verify    export.verify runs every artifact on the --images test images against the sim (and the integer
              reference on --reference-images): top-1 agreement, logit error in int8 steps. Accuracy: artifact.
  6 device    only with --target: devices.bundle packs each export, devices.run runs it on the target (local,
              ssh://user@host, adb, qemu-aarch64), checks it against the sim there and times it.
  then the report: OUT/report.md, report.json, report.png (accuracy after every stage).

Resume: a stage whose stage.json exists and whose inputs (its flags and every earlier stage) are unchanged is
kept; the first stage that is not is run again, and so is everything after it. Every bad input (spec, flags,
files, target) is refused before stage 1 with one line (exit 2). Exit 0: every artifact verified; 1: written,
but an artifact failed verification (here or on the target).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ghnq.cli import UserError, run_cli
from ghnq.fileio import atomic_torch_save, atomic_write, atomic_write_text, sha256_file

STAGES = ("predict", "quantize", "refine", "export", "verify", "device")
FORMATS = ("tflite", "executorch")
BITS = (8, 4, 2)
DONE, STARTED = "stage.json", "started.json"
LAYOUT = 1  # of the stage records: part of every resume key, bumped when a stage's outputs change meaning


@dataclass
class Ctx:
    """What every stage reads: the flags, the spec, the data, and what earlier stages left."""

    args: argparse.Namespace
    spec: dict
    name: str
    out: Path
    target: Any
    test: np.ndarray = field(default_factory=lambda: np.zeros(0))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0))
    calib: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sources: dict[str, str] = field(default_factory=dict)
    done: dict[str, dict] = field(default_factory=dict)  # stage → its stage.json
    built: dict[str, Any] = field(default_factory=dict)  # format → export.pipeline.Built (this process only)
    key: str = ""  # chained: a stage's key covers its own flags and every earlier stage's key


def sim_top1(qm: Any, images: np.ndarray, labels: np.ndarray) -> float:
    from calibration import simulate

    return float((np.argmax(simulate(qm, images), axis=1) == labels).mean())


def final_qm_path(ctx: Ctx) -> Path:
    refine = ctx.done.get("refine", {})
    return Path(refine["outputs"]["qm"] if "outputs" in refine else ctx.done["quantize"]["outputs"]["qm"])


# ----------------------------------------------------------------------------------------------------
# Stages: each takes (ctx, its folder) and returns its record (outputs, accuracy, facts for the report)


def stage_predict(ctx: Ctx, folder: Path) -> dict:
    from calibration.bn import has_placeholder_bn, recalibrate_bn
    from export.verify import float_accuracy
    from ghnq.spec import build_model
    from ghnq.weights import obtain_weights

    a = ctx.args
    model = build_model(ctx.spec)
    weights = obtain_weights(model, a.weights, bits=a.bits, seed=a.seed, quiet=a.quiet)
    bn = has_placeholder_bn(model)  # predicted or random weights (or an unmeasured file) come with placeholders
    if bn:
        recalibrate_bn(model, ctx.calib, progress=not a.quiet)
    path = atomic_torch_save(folder / "weights.pt", model.state_dict())
    return {"outputs": {"weights": str(path)}, "weights": weights, "bn_recalibrated": bn,
            "accuracy": float_accuracy(model, ctx.test, ctx.labels), "accuracy_of": "float model"}


def stage_quantize(ctx: Ctx, folder: Path) -> dict:
    from calibration import calibrate
    from calibration.qmodel import save
    from ghnq.spec import build_model
    from ghnq.train import load_weights

    a = ctx.args
    model = load_weights(build_model(ctx.spec), ctx.done["predict"]["outputs"]["weights"])
    qm = calibrate(model, ctx.calib, method=a.method, weight_bits=a.bits, act_bits=8, bn_recalibrate=False,
                   progress=not a.quiet, meta={"name": ctx.name, "weights": ctx.done["predict"]["weights"],
                                               "calibration_source": ctx.sources["calib"]})
    path = save(qm, folder / f"{ctx.name}.qm")
    return {"outputs": {"qm": str(path)}, "accuracy": sim_top1(qm, ctx.test, ctx.labels),
            "accuracy_of": f"fake-quant sim, W{a.bits}A8"}


def stage_refine(ctx: Ctx, folder: Path) -> dict:
    from calibration.qmodel import load
    from ghnq import evolve

    a = ctx.args
    if a.bits == 8:
        return {"skipped": "8-bit weights: nothing to refine (the EA-CC search is for bits < 8)"}
    argv = ["--arch", a.arch, "--bits", str(a.bits), "--init", "ckpt", "--weights",
            ctx.done["quantize"]["outputs"]["qm"], "--budget-evals", str(a.budget_evals), "--out", str(folder),
            "--eval-images", "0", "--seed", str(a.seed), "--threads", str(a.threads),
            "--checkpoint-every", str(a.checkpoint_every)]
    if a.train_images:
        argv += ["--train-images", str(a.train_images)]
    if a.data_root:
        argv += ["--data-root", a.data_root]
    if a.quiet:
        argv.append("--no-progress")
    if (folder / evolve.STATE_FILE).exists():  # a killed search of this same stage: continue it
        argv.append("--resume")
    rc = evolve.main(argv)
    if rc:
        raise UserError(f"ghnq.evolve exited with {rc}")
    path = folder / f"{ctx.name}.qm"
    history = json.loads((folder / "history.json").read_text())["report"]
    return {"outputs": {"qm": str(path)}, "accuracy": sim_top1(load(path), ctx.test, ctx.labels),
            "accuracy_of": f"fake-quant sim, W{a.bits}A8, after EA-CC",
            "evolve": {k: history[k] for k in ("evals", "wall_s", "accepted_groups", "changed_weights", "n_weights")}}


def _writer(fmt: str) -> Callable:
    if fmt == "tflite":
        from export.tflite import build
    else:
        from export.executorch import build
    return build


def _export(ctx: Ctx, fmt: str, qm: Any, folder: Path) -> Any:
    ns = argparse.Namespace(threads=ctx.args.threads, per_layer=False)
    built = _writer(fmt)(qm, folder, ctx.name, ns)  # checks the QM, then writes atomically
    ctx.built[fmt] = built
    return built


def stage_export(ctx: Ctx, folder: Path) -> dict:
    from calibration.qmodel import load, save

    qm = load(final_qm_path(ctx))
    rec: dict[str, Any] = {"formats": {}}
    for fmt in ctx.args.formats:
        built = _export(ctx, fmt, qm, folder / fmt)
        save(qm, folder / fmt / f"{ctx.name}.qm")  # the export folder is self-contained (devices.bundle reads it)
        files = {k: str(v) for k, v in built.artifacts.items()}
        rec["formats"][fmt] = {"artifact": str(built.artifact), "artifacts": files,
                               "sha256": {k: sha256_file(v) for k, v in files.items()},
                               "size_bytes": {k: Path(v).stat().st_size for k, v in files.items()},
                               "writer": built.info}
    return rec


def stage_verify(ctx: Ctx, folder: Path) -> dict:
    from calibration.qmodel import load
    from export.pipeline import _io_quantization  # the I/O (scale, zp) entry devices.bundle reads from report.json
    from export.verify import Tolerance, verify, write_report

    a = ctx.args
    qm = load(final_qm_path(ctx))
    rec: dict[str, Any] = {"formats": {}}
    for fmt in a.formats:
        exported = ctx.done["export"]["formats"][fmt]
        fdir = Path(exported["artifact"]).parent
        built = ctx.built.get(fmt)
        if built is None:  # resumed after the export stage: reopen the runners (the writer is deterministic)
            built = _export(ctx, fmt, qm, fdir)
            if sha256_file(built.artifact) != exported["sha256"]["int8"]:
                raise UserError(f"{built.artifact}: rebuilt artifact differs from the export stage's; rerun "
                                f"after deleting {folder.parent / '4-export'}")
        tol = Tolerance(a.max_step_error, a.min_agreement)
        metrics = verify(qm, built.runners, ctx.test, ctx.labels, fdir, tol=tol,
                         reference_images=a.reference_images, quiet=a.quiet)
        report = {"name": ctx.name, "format": fmt, "artifact": exported["artifact"], "artifacts": exported["artifacts"],
                  "sha256": exported["sha256"], "weights": ctx.done["predict"]["weights"], "spec": a.arch,
                  "calibration": {"method": a.method, "weight_bits": a.bits, "images": len(ctx.calib),
                                  "source": ctx.sources["calib"]},
                  "verify_source": ctx.sources["test"], "quantization": _io_quantization(qm), **metrics}
        write_report(fdir, report)  # the export folder's report.json: devices.bundle takes its tolerance
        keep = ("runtime", "images", "top1_agreement", "max_step_error", "p99_step_error", "accuracy_artifact",
                "accuracy_sim", "passed", "failures", "tolerance", "plots")
        rec["formats"][fmt] = {k: metrics.get(k) for k in keep}
        rec["formats"][fmt]["report"] = str(fdir / "report.md")
        if metrics.get("reference"):
            rec["formats"][fmt]["reference_accuracy"] = metrics["reference"]["accuracy_reference"]
    rec["passed"] = all(f["passed"] for f in rec["formats"].values())
    return rec


def stage_device(ctx: Ctx, folder: Path) -> dict:
    from devices.bundle import make_bundle
    from devices.run import run_bundle

    a = ctx.args
    if ctx.target is None:
        return {"skipped": "no --target: nothing run on a device"}
    rec: dict[str, Any] = {"target": ctx.target.name, "formats": {}}
    for fmt in a.formats:
        fdir = Path(ctx.done["export"]["formats"][fmt]["artifact"]).parent
        bundle = make_bundle(fdir)
        eval_args = ["--threads", str(a.threads), "--runs", str(a.runs), *(["--quiet"] if a.quiet else [])]
        rc, result, res_dir = run_bundle(ctx.target, bundle, eval_args, folder / fmt, a.retries)
        if result is None:
            raise UserError(f"{ctx.target.name}: eval.py refused {bundle} (exit {rc}; its message is above)")
        arts = {}
        for file, r in result["artifacts"].items():
            arts[file] = {k: r.get(k) for k in ("precision", "runtime", "accuracy", "accuracy_sim", "top1_agreement",
                                                "max_step_error")}
            arts[file]["latency_ms"] = (r.get("latency_ms") or {}).get("median")
        rec["formats"][fmt] = {"bundle": str(bundle), "result": str(res_dir / "result.json"),
                               "verified": bool(result["verified"]), "failures": result.get("failures", []),
                               "device": result.get("device", {}), "artifacts": arts}
    rec["passed"] = all(f["verified"] for f in rec["formats"].values())
    return rec


RUNNERS: dict[str, Callable[[Ctx, Path], dict]] = {
    "predict": stage_predict, "quantize": stage_quantize, "refine": stage_refine, "export": stage_export,
    "verify": stage_verify, "device": stage_device}


def stage_flags(a: argparse.Namespace, stage: str) -> dict:
    """The flags a stage's output depends on (its resume key); target/run flags only touch the device stage."""
    common = {"layout": LAYOUT, "spec": a.spec_hash, "bits": a.bits, "data": a.data_id, "images": a.images,
              "calib": a.calib_images}
    own = {"predict": {"weights": a.weights_id, "seed": a.seed},
           "quantize": {"method": a.method},
           "refine": {"budget": a.budget_evals, "seed": a.seed, "train_images": a.train_images},
           "export": {"formats": a.formats},
           "verify": {"tol": [a.max_step_error, a.min_agreement], "reference": a.reference_images},
           "device": {"target": a.target, "threads": a.threads, "runs": a.runs, "qemu_cpu": a.qemu_cpu,
                      "python": a.python}}[stage]
    return {**common, **own}


def run_stage(ctx: Ctx, n: int, stage: str) -> dict:
    folder = ctx.out / f"{n}-{stage}"
    key = hashlib.sha256(json.dumps([ctx.key, stage_flags(ctx.args, stage)], sort_keys=True).encode()).hexdigest()
    rec = _read_json(folder / DONE)
    if rec is not None and rec.get("key") == key:
        print(f"[{n}/{len(STAGES)}] {stage}: kept from {folder / DONE}", file=sys.stderr)
    else:
        started = _read_json(folder / STARTED)
        if folder.exists() and (started is None or started.get("key") != key):
            shutil.rmtree(folder)  # made with other inputs: its partial state must not leak into this run
        atomic_write_text(folder / STARTED, json.dumps({"key": key}) + "\n")
        print(f"[{n}/{len(STAGES)}] {stage} ...", file=sys.stderr)
        t0 = time.perf_counter()
        rec = {"stage": stage, "key": key, **RUNNERS[stage](ctx, folder),
               "seconds": round(time.perf_counter() - t0, 1)}
        atomic_write_text(folder / DONE, json.dumps(rec, indent=1, default=str) + "\n")
    ctx.done[stage], ctx.key = rec, key
    return rec


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------------
# The report: one table with the accuracy after every stage


def stage_rows(ctx: Ctx) -> list[dict]:
    d = ctx.done
    rows = []
    for stage in ("predict", "quantize", "refine"):
        r = d[stage]
        rows.append({"stage": stage, "what": r.get("accuracy_of", r.get("skipped", "")), "accuracy": r.get("accuracy"),
                     "output": r.get("outputs", {}).get("qm") or r.get("outputs", {}).get("weights", ""),
                     "seconds": r["seconds"]})
    for fmt, r in d["export"]["formats"].items():
        rows.append({"stage": f"export ({fmt})", "what": ", ".join(f"{k} {v / 1024:.0f} KiB"
                                                                 for k, v in r["size_bytes"].items()),
                     "accuracy": None, "output": r["artifact"], "seconds": d["export"]["seconds"]})
    for fmt, r in d["verify"]["formats"].items():
        status = "verified" if r["passed"] else "FAILED: " + "; ".join(r["failures"])
        rows.append({"stage": f"verify ({fmt})", "accuracy": r["accuracy_artifact"], "output": r["report"],
                     "what": f"{r['runtime']}: {status}; top-1 agreement with sim {100 * r['top1_agreement']:.2f} %, "
                             f"max logit error {r['max_step_error']} steps", "seconds": d["verify"]["seconds"]})
    dev = d["device"]
    if "skipped" in dev:
        rows.append({"stage": "device", "what": dev["skipped"], "accuracy": None, "output": "",
                     "seconds": dev["seconds"]})
    for fmt, r in dev.get("formats", {}).items():
        for file, art in r["artifacts"].items():
            if art["precision"] != "int8":
                continue
            status = "verified" if r["verified"] else "FAILED: " + "; ".join(r["failures"])
            rows.append({"stage": f"device ({fmt})", "accuracy": art["accuracy"], "output": r["result"],
                         "what": f"{dev['target']} ({r['device'].get('machine', '?')}), {art['runtime']}: {status}; "
                                 f"agreement {100 * (art['top1_agreement'] or 0):.2f} %, max error "
                                 f"{art['max_step_error']} steps, latency {art['latency_ms']:.3f} ms ({file})",
                         "seconds": dev["seconds"]})
    return rows


def report_markdown(ctx: Ctx, rows: list[dict], passed: bool) -> str:
    a = ctx.args
    lines = [f"# {ctx.name}: pipeline, W{a.bits}A8 — {'VERIFIED' if passed else 'VERIFICATION FAILED'}", "",
             f"- spec: `{a.arch}`; weights: {ctx.done['predict']['weights']}",
             f"- accuracy: top-1 on {len(ctx.labels)} test images ({ctx.sources['test']}); calibration and BN "
             f"statistics: {len(ctx.calib)} training images ({ctx.sources['calib']})", "",
             "| stage | top-1 | what | seconds | output |", "|---|---:|---|---:|---|"]
    for r in rows:
        acc = "" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f} %"
        lines.append(f"| {r['stage']} | {acc} | {r['what']} | {r['seconds']} | `{r['output']}` |")
    lines += ["", "![accuracy after every stage](report.png)"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r["accuracy"] is not None]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(pts) + 1), 3.8))
    xs = np.arange(len(pts))
    bars = ax.bar(xs, [100 * r["accuracy"] for r in pts], color="tab:blue")
    for b, r in zip(bars, pts, strict=True):
        ax.annotate(f"{100 * r['accuracy']:.1f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs, [r["stage"] for r in pts], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("top-1, %")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=130))
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# The command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ghnq.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", required=True, metavar="SPEC", help="spec.yaml of the model (see specs/)")
    p.add_argument("--bits", type=int, default=8, help="weight bits: 8, 4 or 2 (activations are int8; default 8)")
    p.add_argument("--budget-evals", type=int, default=2000, metavar="N",
                   help="refine stage: EA-CC fitness evaluations (one individual on one mini-batch; default 2000)")
    p.add_argument("--formats", default="tflite", help="comma list of tflite, executorch (default tflite)")
    p.add_argument("--out", metavar="DIR", help="output folder (default out/<name>-pipeline-w<bits>)")
    p.add_argument("--weights", metavar="FILE", help="float weights to start from instead of GHN-Q's prediction")
    p.add_argument("--method", default="minmax", help="activation observer: minmax, percentile, mse, ... (minmax)")
    p.add_argument("--images", type=int, default=1000, metavar="N",
                   help="test images every stage's accuracy and the verification use (1000)")
    p.add_argument("--calib-images", type=int, default=512, metavar="N", help="training images for BN + ranges (512)")
    p.add_argument("--reference-images", type=int, default=100, metavar="N",
                   help="of the test images, how many also run through the integer reference (100)")
    p.add_argument("--train-images", type=int, default=0, metavar="N",
                   help="refine stage: search on the first N training images of a fixed shuffle (default: all)")
    p.add_argument("--checkpoint-every", type=float, default=120.0, metavar="S",
                   help="refine stage: seconds between search checkpoints (120)")
    p.add_argument("--max-step-error", type=int, default=None, metavar="K",
                   help="verification tolerance: every logit within K int8 steps of the sim (export's default)")
    p.add_argument("--min-agreement", type=float, default=None, metavar="F",
                   help="verification tolerance: top-1 agreement with the sim (export's default)")
    p.add_argument("--runs", type=int, default=50, help="device stage: timed latency runs (50)")
    p.add_argument("--data-root", metavar="DIR", help="CIFAR-10 JPEG root (default: $GHNQ_DATA_ROOT or "
                   "../shared/data/cifar10-jpeg; else the embedded 512-image sample)")
    p.add_argument("--seed", type=int, default=0, help="seed of the search (and of a random init) (0)")
    p.add_argument("--threads", type=int, default=1, help="torch / runtime threads (1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    from devices.run import add_target_args

    add_target_args(p)
    p.set_defaults(target=None)  # no target: no device stage
    for act in p._actions:
        if act.dest == "target":
            act.help = "device stage: local | ssh://user@host[:port] | adb[:serial] | qemu-aarch64 (default: none)"
    return p.parse_args(argv)


def check_args(a: argparse.Namespace) -> tuple[dict, Any]:
    """Every bad input, refused before the first long stage. Returns (spec, target or None)."""
    from calibration.observers import METHODS
    from devices.run import target_from_args
    from export.verify import Tolerance
    from ghnq.evolve import EvolveConfig
    from ghnq.sampler import spec_hash
    from ghnq.spec import load_spec
    from ghnq.weights import ghnq_checkpoint

    spec = load_spec(a.arch)
    if a.bits not in BITS:
        raise UserError(f"--bits {a.bits}: allowed {', '.join(map(str, BITS))}")
    a.formats = list(dict.fromkeys(f.strip() for f in a.formats.split(",") if f.strip()))
    if not a.formats or any(f not in FORMATS for f in a.formats):
        raise UserError(f"--formats {','.join(a.formats)!r}: a comma list of {', '.join(FORMATS)}")
    if a.method not in METHODS:
        raise UserError(f"--method {a.method!r}; allowed: {', '.join(METHODS)}")
    cost = EvolveConfig().group_cost()
    if a.bits < 8 and a.budget_evals < cost:
        raise UserError(f"--budget-evals {a.budget_evals}: the refine stage needs ≥ {cost} (one group of the search)")
    for flag in ("images", "calib_images", "reference_images", "threads", "runs"):
        if getattr(a, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(a, flag)}: must be ≥ 1")
    if a.train_images < 0 or a.checkpoint_every <= 0:
        raise UserError("--train-images must be ≥ 0 and --checkpoint-every > 0")
    a.max_step_error = Tolerance.max_steps if a.max_step_error is None else a.max_step_error
    a.min_agreement = Tolerance.min_agreement if a.min_agreement is None else a.min_agreement
    if a.max_step_error < 0 or not 0.0 <= a.min_agreement <= 1.0:
        raise UserError("--max-step-error must be ≥ 0 and --min-agreement in [0, 1]")
    if a.data_root is not None and not Path(a.data_root).is_dir():
        raise UserError(f"--data-root {a.data_root}: no such folder")
    if a.weights is not None and not Path(a.weights).is_file():
        raise UserError(f"--weights {a.weights}: no such file")
    if a.retries < 0:
        raise UserError("--retries must be ≥ 0")
    target = target_from_args(a) if a.target else None  # unreachable-tool / bad-form targets fail here
    ckpt = ghnq_checkpoint()
    a.spec_hash = spec_hash(spec)
    a.weights_id = (f"file:{sha256_file(a.weights)}" if a.weights else
                    f"ghnq:{sha256_file(ckpt)}" if ckpt else "random")
    if a.weights_id == "random":
        print("WARNING: no --weights and no GHN-Q checkpoint shipped in this build: the predict stage uses a seeded "
              "random init (accuracy at chance level)", file=sys.stderr)
    return spec, target


def main(argv: list[str] | None = None) -> int:
    from ghnq.data import fit_images, load_eval_images
    from ghnq.spec import spec_name

    a = parse_args(argv)
    spec, target = check_args(a)
    torch.set_num_threads(a.threads)
    name = spec_name(spec)
    out = Path(a.out or f"out/{name}-pipeline-w{a.bits}")
    test, labels, test_src = load_eval_images(a.images, a.data_root, split="test", quiet=True)
    calib, _, calib_src = load_eval_images(a.calib_images, a.data_root, split="train", quiet=True)
    test, calib = (fit_images(x, spec["input"], f"{a.arch}: input") for x in (test, calib))
    a.data_id = f"{test_src} | {calib_src}"
    ctx = Ctx(a, spec, name, out, target, test, labels, calib, {"test": test_src, "calib": calib_src})
    for n, stage in enumerate(STAGES, 1):
        run_stage(ctx, n, stage)

    rows = stage_rows(ctx)
    passed = bool(ctx.done["verify"]["passed"] and ctx.done["device"].get("passed", True))
    report = {"name": name, "spec": a.arch, "bits": a.bits, "formats": a.formats, "target": a.target,
              "passed": passed, "images": len(labels), "test_source": test_src, "calibration_source": calib_src,
              "stages": rows, "stage_records": ctx.done}
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, default=str) + "\n")
    md = atomic_write_text(out / "report.md", report_markdown(ctx, rows, passed))
    plot(rows, out / "report.png", f"{name}, W{a.bits}A8: top-1 after every stage ({len(labels)} test images)")
    for r in rows:
        acc = "" if r["accuracy"] is None else f"{100 * r['accuracy']:6.2f} %"
        print(f"{r['stage']:<20} {acc:>9}  {r['what']}")
    print(f"{'verified' if passed else 'VERIFICATION FAILED'}; report: {md} (report.json, report.png)")
    return 0 if passed else 1


if __name__ == "__main__":
    run_cli(main)
