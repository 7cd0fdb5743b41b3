"""Compare two runs of the same QuantizedModel: per-layer error in int8 steps, top-1 agreement, a PNG.

A run is a dict tensor name → int8 codes (NHWC, batch first), e.g. `simulate(qm, x, capture=True)[1]`,
`reference.run(qm, x, capture=True)[1]`, or an artifact's intermediate tensors. Only names present in both
are compared, in the QM's op order when a QM is given.

    python -m calibration.compare model.qm --images 500 [--png report.png]     # sim vs integer reference
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ghnq.cli import UserError, run_cli


@dataclass
class LayerDiff:
    name: str
    max_abs: int  # largest |a - b| in int8 steps
    mean_abs: float
    frac_differ: float  # fraction of codes that differ at all
    frac_over_1: float  # fraction of codes more than one step apart


@dataclass
class Comparison:
    layers: list[LayerDiff]
    top1_agreement: float
    logits_within_1: float  # fraction of output codes within one int8 step
    logits_max_abs: int
    n: int

    def summary(self) -> str:
        return (f"{self.n} images: top-1 agreement {self.top1_agreement:.4%}, logits within 1 step "
                f"{self.logits_within_1:.4%}, max logit error {self.logits_max_abs} steps")

    def table(self) -> str:
        rows = [f"{'tensor':<40} {'max':>4} {'mean':>8} {'differ':>8} {'>1':>8}"]
        rows += [f"{d.name[:40]:<40} {d.max_abs:>4} {d.mean_abs:>8.4f} {d.frac_differ:>8.4%} {d.frac_over_1:>8.4%}"
                 for d in self.layers]
        return "\n".join(rows)


def layer_diff(name: str, a: np.ndarray, b: np.ndarray) -> LayerDiff:
    if a.shape != b.shape:
        raise UserError(f"tensor {name!r}: shapes differ between the runs ({list(a.shape)} vs {list(b.shape)})")
    d = np.abs(a.astype(np.int32) - b.astype(np.int32))
    return LayerDiff(name, int(d.max(initial=0)), float(d.mean()) if d.size else 0.0,
                     float((d > 0).mean()) if d.size else 0.0, float((d > 1).mean()) if d.size else 0.0)


def compare(logits_a: np.ndarray, logits_b: np.ndarray, run_a: dict[str, np.ndarray] | None = None,
            run_b: dict[str, np.ndarray] | None = None, order: list[str] | None = None) -> Comparison:
    """Logit codes [N, classes] of both runs, plus optional per-tensor codes for the per-layer table."""
    if logits_a.shape != logits_b.shape:
        raise UserError(f"logits shapes differ: {list(logits_a.shape)} vs {list(logits_b.shape)}")
    names = [n for n in (order or sorted(run_a or {})) if run_a and run_b and n in run_a and n in run_b]
    layers = [layer_diff(n, run_a[n], run_b[n]) for n in names]
    d = np.abs(logits_a.astype(np.int32) - logits_b.astype(np.int32))
    return Comparison(layers, float((logits_a.argmax(1) == logits_b.argmax(1)).mean()), float((d <= 1).mean()),
                      int(d.max(initial=0)), len(logits_a))


def plot(c: Comparison, logits_a: np.ndarray, logits_b: np.ndarray, path: str | Path,
         labels: tuple[str, str] = ("sim", "reference")) -> Path:
    """PNG: per-layer error bars (max and mean |diff| in int8 steps) and a logit scatter, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ghnq.fileio import atomic_write

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [2, 1]})
    x = np.arange(len(c.layers))
    ax1.bar(x - 0.2, [d.max_abs for d in c.layers], 0.4, label="max |diff|")
    ax1.bar(x + 0.2, [d.mean_abs for d in c.layers], 0.4, label="mean |diff|")
    ax1.set_xticks(x, [d.name for d in c.layers], rotation=90, fontsize=6)
    ax1.set_ylabel("int8 steps")
    ax1.set_title(f"per-layer error, {labels[0]} vs {labels[1]}")
    ax1.legend()
    ax2.scatter(logits_b.ravel(), logits_a.ravel(), s=2, alpha=0.3)
    lo, hi = int(min(logits_a.min(), logits_b.min())), int(max(logits_a.max(), logits_b.max()))
    ax2.plot([lo, hi], [lo, hi], "k--", lw=0.5)
    ax2.set_xlabel(f"{labels[1]} logit code")
    ax2.set_ylabel(f"{labels[0]} logit code")
    ax2.set_title(f"top-1 agreement {c.top1_agreement:.2%}, within 1: {c.logits_within_1:.2%}")
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    from calibration import reference
    from calibration.qmodel import load
    from calibration.sim import simulate
    from ghnq.data import fit_images, load_eval_images

    p = argparse.ArgumentParser(prog="python -m calibration.compare",
                                description="Per-layer comparison of the fake-quant sim and the integer reference.")
    p.add_argument("qm", help="a .qm file")
    p.add_argument("--images", type=int, default=200, help="test images (default 200)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--png", default=None, help="write the per-layer / logit plot here")
    a = p.parse_args(argv)
    if a.images < 1:
        raise UserError(f"--images: got {a.images}; need at least 1")
    qm = load(a.qm)
    images, _, _ = load_eval_images(a.images, root=a.data_root)
    _, h, w, c = qm.tensors[qm.input].shape
    images = fit_images(images, (c, h, w), f"{a.qm}: input tensor {qm.input!r}")
    ls, rs = simulate(qm, images, capture=True)
    lr, rr = reference.run(qm, images, capture=True)
    c = compare(ls, lr, rs, rr, order=[qm.input] + [op.outputs[0] for op in qm.ops])
    print(c.table())
    print(c.summary())
    if a.png:
        print(f"wrote {plot(c, ls, lr, a.png)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
