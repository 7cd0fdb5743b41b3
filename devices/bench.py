"""Latency of every artifact of a bundle at 1..4 threads on one target (a Raspberry Pi over ssh, typically).

    python -m devices.bench --target ssh://pi@raspberrypi out/<name>/bundle/       # → out/<name>/bench/<target>/
    python -m devices.bench --target local --threads 1,2 out/<name>/bundle/

Each (artifact, threads) pair is one eval.py run on the target (latency only: warm-up, then `--runs` timed
single-image runs). Accuracy and verification are separate (`python -m devices.run`): thread count does not
change what is computed. Writes bench.json, bench.md (a markdown table) and bench.png (median latency with
p90 whiskers, int8 vs fp32).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from devices.run import add_target_args, run_bundle, target_from_args
from ghnq.cli import UserError, run_cli
from ghnq.fileio import atomic_write, atomic_write_text


def _threads(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--threads {text!r}: expected a comma-separated list of positive integers, e.g. 1,2,3,4") \
            from None
    if not values or min(values) < 1:
        raise UserError(f"--threads {text!r}: expected a comma-separated list of positive integers, e.g. 1,2,3,4")
    return values


def table(rows: list[dict]) -> str:
    lines = ["| artifact | precision | threads | median ms | p90 ms | mean ms | min ms | runtime |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lat = r["latency_ms"]
        lines.append(f"| {r['artifact']} | {r['precision']} | {r['threads']} | {lat['median']:.3f} | "
                     f"{lat['p90']:.3f} | {lat['mean']:.3f} | {lat['min']:.3f} | {r['runtime']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for art in dict.fromkeys(r["artifact"] for r in rows):
        rs = [r for r in rows if r["artifact"] == art]
        t = [r["threads"] for r in rs]
        med = [r["latency_ms"]["median"] for r in rs]
        p90 = [r["latency_ms"]["p90"] - r["latency_ms"]["median"] for r in rs]
        ax.errorbar(t, med, yerr=[[0] * len(rs), p90], marker="o", capsize=3, label=f"{art} ({rs[0]['precision']})")
    ax.set_xlabel("threads")
    ax.set_ylabel("latency per image, ms (median, whisker to p90)")
    ax.set_xticks(sorted({r["threads"] for r in rows}))
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devices.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle folder (python -m devices.bundle out/<name>/ makes it)")
    add_target_args(p)
    p.add_argument("--threads", default="1,2,3,4", help="thread counts (default 1,2,3,4)")
    p.add_argument("--runs", type=int, default=100, help="timed runs per point (default 100)")
    p.add_argument("--warmup", type=int, default=20, help="warm-up runs per point (default 20)")
    p.add_argument("--out", default=None, help="output folder (default <bundle>/../bench/<target>)")
    args = p.parse_args(argv)
    threads = _threads(args.threads)
    if args.runs < 1 or args.warmup < 0:
        raise UserError("--runs must be >= 1 and --warmup >= 0")
    target = target_from_args(args)
    bundle = Path(args.bundle).resolve()
    out = Path(args.out) if args.out else bundle.parent / "bench" / target.name
    manifest_path = bundle / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"{bundle}: no manifest.json (make the bundle with python -m devices.bundle out/<name>/)")
    artifacts = json.loads(manifest_path.read_text())["artifacts"]

    rows = []
    for art in artifacts:
        for t in threads:
            eval_args = ["--artifact", art["file"], "--threads", str(t), "--skip-accuracy", "--runs",
                         str(args.runs), "--warmup", str(args.warmup)]
            rc, result, _ = run_bundle(target, bundle, eval_args, out / "runs" / f"{art['file']}-t{t}",
                                       args.retries, results_name=f"bench-{art['file']}-t{t}")
            if result is None:
                raise UserError(f"eval.py failed on {target.name} (exit {rc}) for {art['file']} at {t} threads")
            rec = result["artifacts"][art["file"]]
            rows.append({"artifact": art["file"], "precision": art["precision"], "threads": t,
                         "latency_ms": rec["latency_ms"], "runtime": rec["runtime"], "device": result["device"]})
    title = f"{bundle.parent.name} on {target.name}"
    atomic_write_text(out / "bench.json", json.dumps({"target": target.name, "rows": rows}, indent=2) + "\n")
    md = f"# Latency: {title}\n\n{table(rows)}"
    atomic_write_text(out / "bench.md", md)
    plot(rows, out / "bench.png", title)
    print(md)
    print(f"wrote {out / 'bench.md'}, {out / 'bench.png'}, {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
