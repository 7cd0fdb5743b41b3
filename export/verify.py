"""Verification shared by every exporter: run an artifact on real images, compare with the sim and the reference.

An exporter hands over *runners*: callables `runner(x_codes) -> outputs` taking the QM's int8 input codes
(NHWC [N, H, W, C], `pixel - 128`) and returning one row per image; each has a `name` (runtime + settings).
  * `runner`         the artifact as a device runs it (LiteRT with XNNPACK, the ExecuTorch runtime): int8 logit
                     codes, held to the tolerance against the sim.
  * `exact_runners`  runs that must equal the integer reference code for code (LiteRT's reference kernels).
  * `layer_runners`  runners with `.tensors(x_codes) -> {tensor name: codes}` for `--per-layer`.
  * `float_runners`  float artifacts (the fp32 twin): accuracy only.

Metrics (report.json keys): `top1_agreement` (artifact vs sim, 0..1), `max_step_error` / `p99_step_error`
(|artifact − sim| over every logit, in int8 steps), `accuracy_artifact` / `accuracy_sim` / `accuracy_float`,
the same against the integer reference (`reference_*`) when calibration provides it, and per exact runner the
number of differing codes. "The sim" is `simulate(..., rounding=runner.arithmetic)`: a runner declares the int8
arithmetic it implements ("xnnpack" for LiteRT's default delegate, "executorch" for ExecuTorch's XNNPACK backend
= XNNPACK's int8 kernels plus its fp32-inside-the-delegate table ops / avg pool, "tflite" for TFLite's kernels),
so the tolerance measures the file, not a known rounding difference; `vs_tflite_sim` (and, for "executorch",
`vs_xnnpack_sim`: what LiteRT's delegate computes) reports the artifact against the other sims for information.
The verification inputs, that sim's expected codes (what a device running the artifact's runtime must
reproduce) and the labels are saved under `verify/` for the device bundle (devices/bundle.py reads these names).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from calibration.qmodel import QuantizedModel
from calibration.sim import input_codes, simulate
from ghnq.data import to_float
from ghnq.fileio import atomic_write, atomic_write_text

VERIFY_FILES = {"inputs": "inputs_int8.npy", "expected": "expected_int8.npy", "labels": "labels.npy"}


class Runner(Protocol):
    name: str
    arithmetic: str  # "xnnpack", "executorch" or "tflite" (calibration.sim roundings): the sim it is held to

    def __call__(self, x: np.ndarray) -> np.ndarray: ...


@dataclass
class Tolerance:
    """What "verified" means for the artifact run as a device runs it, against the fake-quant sim."""

    max_steps: int = 1  # every logit within this many int8 steps of the sim
    min_agreement: float = 0.999  # top-1 agreement with the sim


@dataclass
class Runners:
    runner: Runner
    exact_runners: list[Runner] = field(default_factory=list)
    layer_runners: list[Any] = field(default_factory=list)
    float_runners: list[Runner] = field(default_factory=list)


def reference_run(qm: QuantizedModel, images: np.ndarray, capture: bool = False) -> Any:
    """calibration's integer reference (None when this build has none yet)."""
    try:
        from calibration import reference
    except ImportError:
        return None
    return reference.run(qm, images, capture=capture) if capture else reference.run(qm, images)


def step_errors(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    d = np.abs(a.astype(np.int32) - b.astype(np.int32))
    return {"max": int(d.max()), "p99": float(np.percentile(d, 99)), "mean": float(d.mean()),
            "differing_codes": int((d > 0).sum()), "codes": int(d.size)}


def top1(a: np.ndarray) -> np.ndarray:
    return np.argmax(a.reshape(len(a), -1), axis=1)


def float_accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 250) -> float:
    model.eval()
    hits = 0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            hits += int((model(to_float(images[i:i + batch_size])).argmax(1).numpy() == labels[i:i + batch_size]).sum())
    return hits / len(images)


def _timed(desc: str, fn: Callable[[], Any], quiet: bool) -> Any:
    with tqdm(total=1, desc=desc, disable=quiet, leave=False) as bar:
        out = fn()
        bar.update(1)
    return out


def verify(qm: QuantizedModel, runners: Runners, images: np.ndarray, labels: np.ndarray, out_dir: Path,
           float_model: nn.Module | None = None, tol: Tolerance | None = None, per_layer: bool = False,
           per_layer_images: int = 100, reference_images: int = 250, quiet: bool = False) -> dict[str, Any]:
    """Run everything on `images` (uint8 NHWC), write verify/ + plots, return the metrics (see module doc).

    The integer reference and the exact runners (slow: numpy / reference kernels) see the first
    `reference_images` images; the artifact and the sim see all of them.
    """
    tol = tol or Tolerance()
    x = input_codes(images)
    nr = min(reference_images, len(images))
    arithmetic = getattr(runners.runner, "arithmetic", "tflite")
    sim = _timed(f"sim ({arithmetic} rounding)", lambda: simulate(qm, images, rounding=arithmetic), quiet)
    # the TFLite-rounding sim, for information: how far the runtime's own rounding moves the logits
    sim_tflite = sim if arithmetic == "tflite" else _timed("sim (tflite rounding)", lambda: simulate(qm, images),
                                                           quiet)
    sim_xnn = _timed("sim (xnnpack rounding)", lambda: simulate(qm, images, rounding="xnnpack"),
                     quiet) if arithmetic == "executorch" else None
    ref = _timed("integer reference", lambda: reference_run(qm, images[:nr]), quiet)
    out = _timed(runners.runner.name, lambda: runners.runner(x), quiet)
    vs_sim = step_errors(out, sim)
    r: dict[str, Any] = {
        "runtime": runners.runner.name,
        "arithmetic": arithmetic,
        "images": len(images),
        "top1_agreement": float((top1(out) == top1(sim)).mean()),
        "max_step_error": vs_sim["max"],
        "p99_step_error": vs_sim["p99"],
        "mean_step_error": vs_sim["mean"],
        "logits_within_1_step": float((np.abs(out.astype(np.int32) - sim) <= 1).mean()),
        "accuracy_artifact": float((top1(out) == labels).mean()),
        "accuracy_sim": float((top1(sim) == labels).mean()),
        "accuracy_float": float_accuracy(float_model, images, labels) if float_model is not None else None,
        "tolerance": {"max_step_error": tol.max_steps, "min_top1_agreement": tol.min_agreement},
        "vs_tflite_sim": {"top1_agreement": float((top1(out) == top1(sim_tflite)).mean()),
                          **{k: v for k, v in step_errors(out, sim_tflite).items() if k in ("max", "p99",
                                                                                           "differing_codes")}},
    }
    if sim_xnn is not None:
        r["vs_xnnpack_sim"] = {"top1_agreement": float((top1(out) == top1(sim_xnn)).mean()),
                               **{k: v for k, v in step_errors(out, sim_xnn).items() if k in ("max", "p99",
                                                                                             "differing_codes")}}
    failures = []
    if r["max_step_error"] > tol.max_steps:
        failures.append(f"max step error {r['max_step_error']} > {tol.max_steps}")
    if r["top1_agreement"] < tol.min_agreement:
        failures.append(f"top-1 agreement {r['top1_agreement']:.4f} < {tol.min_agreement}")
    if ref is not None:
        vs_ref = step_errors(out[:nr], ref)
        r["reference"] = {"images": nr, "top1_agreement": float((top1(out[:nr]) == top1(ref)).mean()),
                          "max_step_error": vs_ref["max"], "p99_step_error": vs_ref["p99"],
                          "accuracy_reference": float((top1(ref) == labels[:nr]).mean()),
                          "accuracy_sim": float((top1(sim[:nr]) == labels[:nr]).mean()),
                          "sim_vs_reference_max_step_error": step_errors(sim[:nr], ref)["max"]}
    else:
        r["reference"] = None
    r["exact"] = []
    for er in runners.exact_runners:
        if ref is None:
            break
        e = step_errors(_timed(er.name, lambda er=er: er(x[:nr]), quiet), ref)
        r["exact"].append({"runtime": er.name, "images": nr, "differing_codes": e["differing_codes"],
                           "codes": e["codes"], "max_step_error": e["max"]})
        if e["differing_codes"]:
            failures.append(f"{er.name}: {e['differing_codes']} of {e['codes']} output codes differ from the "
                            "integer reference (must be 0)")
    for fr in runners.float_runners:
        pred = top1(_timed(fr.name, lambda fr=fr: fr(x), quiet))
        r.setdefault("float_artifacts", []).append({"runtime": fr.name, "accuracy": float((pred == labels).mean())})
    r["passed"], r["failures"] = not failures, failures

    vdir = out_dir / "verify"
    for key, arr in (("inputs", x), ("expected", sim.astype(np.int8)), ("labels", labels.astype(np.int64))):
        atomic_write(vdir / VERIFY_FILES[key], lambda f, arr=arr: np.save(f, arr, allow_pickle=False))
    r["verify_files"] = {k: str(vdir / v) for k, v in VERIFY_FILES.items()}
    r["plots"] = [str(plot_logit_errors(out, sim, ref, out_dir / "logit_step_errors.png", runners.runner.name))]
    if per_layer:
        n = min(per_layer_images, len(images))
        r["per_layer"] = per_layer_errors(qm, runners.layer_runners, images[:n], quiet)
        r["per_layer_images"] = n
        r["plots"].append(str(plot_per_layer(r["per_layer"], out_dir / "per_layer_step_errors.png")))
    return r


def per_layer_errors(qm: QuantizedModel, layer_runners: list[Any], images: np.ndarray, quiet: bool) -> list[dict]:
    """Every op output of the artifact (per layer runner) against the sim's and the reference's codes."""
    x = input_codes(images)
    _, sim = simulate(qm, images, capture=True)
    ref_res = reference_run(qm, images, capture=True)
    ref = ref_res[1] if ref_res is not None else None
    got = {lr.name: lr.tensors(x) for lr in tqdm(layer_runners, desc="per-layer", disable=quiet, leave=False)}
    rows = []
    for i, op in enumerate(qm.ops):
        name = op.outputs[0]
        row: dict[str, Any] = {"index": i, "op": op.kind, "tensor": name, "source": op.source}
        for label, tensors in got.items():
            if name not in tensors:
                continue
            a = tensors[name].reshape(sim[name].shape)
            row[f"{label} vs sim"] = step_errors(a, sim[name])
            if ref is not None and name in ref:
                row[f"{label} vs reference"] = step_errors(a, ref[name].reshape(a.shape))
        if not any(name in tensors for tensors in got.values()):
            row["note"] = "not a tensor of the artifact (the writer fused this op into the next one)"
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------
# Plots


def _save_fig(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def plot_logit_errors(out: np.ndarray, sim: np.ndarray, ref: np.ndarray | None, path: Path, name: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    pairs = [("artifact − sim", out, sim)]
    if ref is not None:  # the reference ran on the first len(ref) images
        pairs += [("artifact − reference", out[:len(ref)], ref), ("sim − reference", sim[:len(ref)], ref)]
    lo = min(int((a.astype(np.int32) - b).min()) for _, a, b in pairs)
    hi = max(int((a.astype(np.int32) - b).max()) for _, a, b in pairs)
    bins = np.arange(lo - 0.5, hi + 1.5)
    for label, a, b in pairs:
        ax.hist((a.astype(np.int32) - b).ravel(), bins=bins, alpha=0.5, label=label, log=True)
    ax.set_xlabel("logit difference (int8 steps)")
    ax.set_ylabel("logits")
    ax.set_title(f"{name}: {len(out)} images", fontsize=9)
    ax.legend(fontsize=8)
    return _save_fig(fig, path)


def plot_per_layer(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = sorted({k for r in rows for k in r if k.endswith((" vs sim", " vs reference"))})
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(rows)), 3.8))
    idx = np.arange(len(rows))
    for s in series:
        ax.plot(idx, [r[s]["max"] if s in r else np.nan for r in rows], marker="o", ms=3, label=f"{s} (max)")
    ax.set_xticks(idx, [f"{r['index']}:{r['op']}" for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("max |difference| (int8 steps)")
    ax.set_title("per-layer output codes", fontsize=9)
    ax.legend(fontsize=7)
    return _save_fig(fig, path)


# ----------------------------------------------------------------------------------------------------
# Report files


def write_report(out_dir: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """report.json (everything) and report.md (the summary a person reads), both atomically."""
    js = atomic_write_text(out_dir / "report.json", json.dumps(report, indent=1, default=str) + "\n")
    return js, atomic_write_text(out_dir / "report.md", report_markdown(report))


def report_markdown(r: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.2f} %"

    status = "PASSED" if r.get("passed") else "FAILED: " + "; ".join(r.get("failures", []))
    lines = [f"# {r.get('name', 'model')}: {r.get('format', 'export')} — verification {status}", "",
             f"- artifact: `{r.get('artifact')}`"]
    for k, v in (r.get("artifacts") or {}).items():
        lines.append(f"- {k}: `{v}`")
    lines += [f"- weights: {r.get('weights')}", f"- calibration: {r.get('calibration')}",
              f"- verified on {r.get('images')} images ({r.get('verify_source')}) with {r.get('runtime')}, "
              f"against the sim with {r.get('arithmetic', 'tflite')} arithmetic"]
    lines += [f"- note: {n}" for n in r.get("notes", [])]
    fp32_ops = ((r.get("writer") or {}).get("delegation") or {}).get("fp32_inside_delegate")
    if fp32_ops:
        lines.append("- fp32 inside the delegate (dequantize → float32 op → quantize; modelled by the sim): "
                     + ", ".join(f"{k} ×{v}" for k, v in fp32_ops.items()))
    lines += ["",
              "| metric | value |", "|---|---|",
              f"| top-1 agreement, artifact vs sim | {pct(r.get('top1_agreement'))} |",
              f"| max / p99 logit error vs sim (int8 steps) | {r.get('max_step_error')} / {r.get('p99_step_error')} |",
              f"| logits within 1 step of sim | {pct(r.get('logits_within_1_step'))} |",
              f"| accuracy: artifact / sim / float | {pct(r.get('accuracy_artifact'))} / {pct(r.get('accuracy_sim'))}"
              f" / {pct(r.get('accuracy_float'))} |"]
    ref = r.get("reference")
    if ref:
        lines += [f"| top-1 agreement, artifact vs integer reference | {pct(ref['top1_agreement'])} |",
                  f"| max / p99 logit error vs integer reference | {ref['max_step_error']} / {ref['p99_step_error']} |",
                  f"| accuracy, integer reference | {pct(ref['accuracy_reference'])} |"]
    for e in r.get("exact", []):
        lines.append(f"| {e['runtime']} vs integer reference: differing codes | {e['differing_codes']} of "
                     f"{e['codes']} |")
    for fa in r.get("float_artifacts", []):
        lines.append(f"| accuracy, {fa['runtime']} | {pct(fa['accuracy'])} |")
    exact = r.get("exact") or []
    if not r.get("passed") and exact and all(e["differing_codes"] == 0 for e in exact):
        lines += ["", f"The file itself is exact ({', '.join(e['runtime'] for e in exact)} = the integer reference, "
                  "code for code). The tolerance misses come from the runtime's own int8 rounding (the "
                  "XNNPACK delegate rounds up to one code per op differently from the reference kernels), "
                  "accumulated through the network."]
    if r.get("per_layer"):
        series = sorted({k for row in r["per_layer"] for k in row if k.endswith((" vs sim", " vs reference"))})
        lines += ["", f"## Per layer ({r.get('per_layer_images')} images; max |difference| in int8 steps)", "",
                  "| # | op | tensor | " + " | ".join(series) + " |", "|---|---|---|" + "---|" * len(series)]
        for row in r["per_layer"]:
            cells = [str(row[s]["max"]) if s in row else "" for s in series]
            lines.append(f"| {row['index']} | {row['op']} | `{row['tensor']}` | " + " | ".join(cells) + " |")
    lines += [""] + [f"![{Path(p).stem}]({Path(p).name})" for p in r.get("plots", [])]
    return "\n".join(lines) + "\n"
