"""Summarize `ghnq.evaluate` sweeps: mean / median / spread of top-1 per bit width and per parameter source.

    .venv/bin/python benchmarks/bench_ghnq_eval.py GHN-Q=runs/eval/ghnq.jsonl random=runs/eval/random.jsonl \
        -o benchmarks/ghnq_eval.png

Each argument is LABEL=FILE, FILE holding `ghnq.evaluate --out` JSON lines ({"spec": .., "top1": {bits: ..}}), or
`benchmarks/bench_rank_trust.py`'s OUT/trained.json (SGD-trained for 1 epoch, integer-graph sim).
Only specs present in every file are compared (so a shorter sweep does not bias a mean); the table says how
many. Prints a markdown table and writes a box plot (one box per source and bit width). `--paired` adds, for every
source after the first, its per-spec difference to the first (mean ± standard error, wins): two GHNs evaluated on
the same specs and images differ by much less than the spread between specs, so the paired difference is the test.
`--heldout-only` keeps the sampled held-out specs (names `s-<hash>`) and drops specs/ and torchvision nets.
`--groups SPACE` adds mean top-1 per shape group of that training space's held-out specs (stem kernel, stride-2
stem, stages wider than the cifar space's 192, CIFAR-like): where on the grammar a GHN does well or badly.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ghnq.sampler import SAMPLED_NAME_PREFIX, SPACES, spec_summary  # noqa: E402

BIT_LABELS = {"float": "float", "8": "W8A8", "4": "W4A8", "4a4": "W4A4"}


def read(path: Path) -> dict[str, dict[str, float]]:
    """`ghnq.evaluate --out` JSON lines, or bench_rank_trust's OUT/trained.json (the SGD-1-epoch yardstick)."""
    if path.suffix == ".json":
        rows = json.loads(path.read_text())["rows"].values()
        return {row["name"]: row["top1"] for row in rows}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[rec["spec"]] = rec["top1"]
    return out


def quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def paired_table(runs: dict[str, dict[str, dict[str, float]]], specs: list[str]) -> str:
    """Every source minus the first, spec by spec: mean difference in points ± its standard error, and wins."""
    (base_label, base), *others = runs.items()
    lines = ["", f"| paired vs {base_label} | bits | specs | mean diff (pt) | std. error | wins | losses |",
             "|---|---|---|---|---|---|---|"]
    for label, res in others:
        for b in BIT_LABELS:
            pairs = [(100 * res[s][b], 100 * base[s][b]) for s in specs if b in res[s] and b in base[s]]
            if len(pairs) < 2:
                continue
            diffs = [a - c for a, c in pairs]
            se = statistics.stdev(diffs) / len(diffs) ** 0.5
            lines.append(f"| {label} | {BIT_LABELS[b]} | {len(diffs)} | {statistics.mean(diffs):+.2f} | {se:.2f} | "
                         f"{sum(d > 0 for d in diffs)} | {sum(d < 0 for d in diffs)} |")
    return "\n".join(lines)


def shape_groups(spec: dict) -> list[str]:
    """The shape groups a sampled spec belongs to (the ways the grammar and deep spaces reach beyond the cifar
    one; the cifar and grammar spaces rarely draw more than 35 layers and never stages wider than 512)."""
    stem = spec["stem"]
    widest = max(st["out"] for st in spec["stages"])
    wide = widest > 192
    stride2 = stem.get("stride", 1) == 2
    layers = spec_summary(spec)["layers"]
    groups = ["all", f"stem {stem['kernel']}x{stem['kernel']}"]
    groups += ["stride-2 stem"] if stride2 else []
    groups += ["widest stage > 192"] if wide else []
    groups += ["widest stage > 512"] if widest > 512 else []
    groups += ["deeper than 35 layers"] if layers > 35 else []
    groups += ["deeper than 50 layers"] if layers > 50 else []
    groups += ["CIFAR-like (stem 3/5 at stride 1, stages <= 192)"] if stem["kernel"] in (3, 5) and not (
        stride2 or wide) else []
    return groups


def group_table(runs: dict[str, dict[str, dict[str, float]]], specs: list[str], space: str) -> str:
    """Mean top-1 per shape group and source, over the given held-out specs of `space`."""
    from ghnq.meta_train import HELDOUT_MAX, heldout_specs

    by_name = {s["name"]: s for s in heldout_specs(HELDOUT_MAX, space)}
    unknown = [s for s in specs if s not in by_name]
    if unknown:
        raise SystemExit(f"--groups {space}: {len(unknown)} specs (e.g. {unknown[0]}) are not held-out specs of "
                         f"the {space} space")
    members: dict[str, list[str]] = {}
    for name in specs:
        for g in shape_groups(by_name[name]):
            members.setdefault(g, []).append(name)
    lines = ["", f"| {space} held-out specs, grouped by | parameters | specs | "
             + " | ".join(BIT_LABELS.values()) + " |", "|---|---|---:|" + "---:|" * len(BIT_LABELS)]
    for g in sorted(members, key=lambda g: (g != "all", g)):
        for label, res in runs.items():
            cells = [f"{statistics.mean(100 * res[s][b] for s in members[g]):.1f}"
                     if all(b in res[s] for s in members[g]) else "" for b in BIT_LABELS]
            lines.append(f"| {g} | {label} | {len(members[g])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="LABEL=FILE")
    ap.add_argument("-o", "--png", default=None)
    ap.add_argument("--specs", choices=("common", "all"), default="common",
                    help="compare on the specs every file has (default) or each file's own")
    ap.add_argument("--paired", action="store_true", help="per-spec differences of every source to the first one")
    ap.add_argument("--heldout-only", action="store_true", help="only the sampled held-out specs (s-<hash>)")
    ap.add_argument("--groups", choices=sorted(SPACES), default=None,
                    help="also mean top-1 per shape group of this space's held-out specs (implies --heldout-only)")
    args = ap.parse_args()
    runs = {}
    for item in args.runs:
        label, _, file = item.partition("=")
        if not file:
            raise SystemExit(f"{item}: expected LABEL=FILE")
        if not Path(file).is_file():
            raise SystemExit(f"{item}: no such file {file}")
        runs[label] = read(Path(file))
        if args.heldout_only or args.groups:
            runs[label] = {k: v for k, v in runs[label].items() if k.startswith(SAMPLED_NAME_PREFIX)}
    common = set.intersection(*(set(r) for r in runs.values()))
    rows, boxes = [], []
    for label, res in runs.items():
        specs = sorted(common) if args.specs == "common" else sorted(res)
        bits = [b for b in BIT_LABELS if all(b in res[s] for s in specs)]
        for b in bits:
            vals = [100 * res[s][b] for s in specs]
            rows.append(f"| {label} | {BIT_LABELS[b]} | {len(vals)} | {statistics.mean(vals):.1f} | "
                        f"{statistics.median(vals):.1f} | {quantile(vals, 0.1):.1f} | {quantile(vals, 0.9):.1f} | "
                        f"{min(vals):.1f} | {max(vals):.1f} |")
            boxes.append((f"{label}\n{BIT_LABELS[b]}", vals))
    print("| parameters | bits | specs | mean | median | p10 | p90 | min | max |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.paired:
        print(paired_table(runs, sorted(common)))
    if args.groups:
        print(group_table(runs, sorted(common), args.groups))
    if args.png:
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(boxes)), 4))
        ax.boxplot([v for _, v in boxes], showmeans=True)
        ax.set_xticks(range(1, len(boxes) + 1), [k for k, _ in boxes], fontsize=8)
        ax.axhline(10, color="grey", lw=0.8, ls=":")
        ax.set_ylabel("CIFAR-10 top-1 (%)")
        ax.set_title("Held-out specs: top-1 per parameter source and bit width")
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
