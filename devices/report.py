"""Sim vs device, per model and target: merges each export's report.json with its device result.json files.

    python -m devices.report out/tiny-mbv2/ out/resnet20/      # → out/devices_report.md + .png

Reads `<export>/report.json` (the exporter's: accuracy_float, accuracy_sim, accuracy_artifact, ...) and every
`<export>/runs/<target>/result.json` that `python -m devices.run` fetched. One row per model, target and
artifact: float / sim / host-artifact / device accuracy, device-vs-sim top-1 agreement and logit error in
int8 steps, latency, verified or not. The plot shows sim and device accuracy side by side.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ghnq.cli import UserError, run_cli
from ghnq.fileio import atomic_write, atomic_write_text


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not readable JSON ({err})") from None


def collect(exports: list[Path]) -> list[dict]:
    rows = []
    for export in exports:
        if not export.is_dir():
            raise UserError(f"{export}: not an export folder (expected out/<name>/)")
        report = _read_json(export / "report.json") if (export / "report.json").is_file() else {}
        results = sorted((export / "runs").glob("*/result.json"))
        if not results:
            raise UserError(f"{export / 'runs'}: no device results (run python -m devices.run first)")
        for path in results:
            result = _read_json(path)
            for art, rec in result.get("artifacts", {}).items():
                if "accuracy" not in rec:
                    continue  # latency-only runs belong to devices.bench
                rows.append({
                    "model": export.name, "target": result.get("target", path.parent.name), "artifact": art,
                    "precision": rec.get("precision"), "machine": result.get("device", {}).get("machine"),
                    "runtime": rec.get("runtime"), "images": rec["images"],
                    "accuracy_float": report.get("accuracy_float"), "accuracy_sim": rec["accuracy_sim"],
                    "accuracy_artifact_host": report.get("accuracy_artifact")
                    if art == Path(str(report.get("artifact"))).name else None,
                    "accuracy_device": rec["accuracy"], "top1_agreement": rec["top1_agreement"],
                    "max_step_error": rec["max_step_error"], "p99_step_error": rec["p99_step_error"],
                    "latency_median_ms": rec.get("latency_ms", {}).get("median"),
                    "verified": (result.get("verified") if rec.get("precision") == "int8" else None),
                })
    return rows


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def markdown(rows: list[dict]) -> str:
    lines = ["| model | target | artifact | images | float % | sim % | host artifact % | device % | "
             "top-1 agree % | max err (steps) | p99 err | median ms | verified |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lat = "–" if r["latency_median_ms"] is None else f"{r['latency_median_ms']:.3f}"
        ver = {True: "yes", False: "**NO**", None: "(fp32, not gated)"}[r["verified"]]
        lines.append(f"| {r['model']} | {r['target']} ({r['machine']}) | {r['artifact']} | {r['images']} | "
                     f"{_pct(r['accuracy_float'])} | {_pct(r['accuracy_sim'])} | {_pct(r['accuracy_artifact_host'])} | "
                     f"{_pct(r['accuracy_device'])} | {_pct(r['top1_agreement'])} | {r['max_step_error']} | "
                     f"{r['p99_step_error']:g} | {lat} | {ver} |")
    return "# Sim vs device\n\n" + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{r['model']}\n{r['target']}\n{r['artifact']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(rows)), 4.5))
    ax.bar(x - 0.2, [100 * r["accuracy_sim"] for r in rows], 0.4, label="sim (expected)")
    ax.bar(x + 0.2, [100 * r["accuracy_device"] for r in rows], 0.4, label="device")
    for i, r in enumerate(rows):
        ax.annotate(f"agree {100 * r['top1_agreement']:.1f}%\nmax {r['max_step_error']} st",
                    (x[i], 100 * max(r["accuracy_sim"], r["accuracy_device"])), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("top-1 accuracy, %")
    ax.set_ylim(0, 110)
    ax.set_title("CIFAR-10 accuracy: simulation vs device")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devices.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exports", nargs="+", help="export folders out/<name>/ with runs/<target>/result.json")
    p.add_argument("--out", default=None, help="output path without suffix (default <first export>/../devices_report)")
    args = p.parse_args(argv)
    exports = [Path(e) for e in args.exports]
    rows = collect(exports)
    if not rows:
        raise UserError("no accuracy results in the given folders (only latency runs?)")
    out = Path(args.out) if args.out else exports[0].resolve().parent / "devices_report"
    md = markdown(rows)
    atomic_write_text(out.with_suffix(".md"), md)
    plot(rows, out.with_suffix(".png"))
    print(md)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    run_cli(main)
