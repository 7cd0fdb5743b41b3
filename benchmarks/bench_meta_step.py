"""Meta-training step time on this CPU: the training loop's kernels before and after, side by side (issue 6).

    python -m benchmarks.bench_meta_step --steps 4 --repeat 3 --threads 1

One step = GHN-Q predicts 8 sampled nets' parameters, each net runs 64 images with quantization in the loop
(bit widths 8/4/float), the mean loss backpropagates into the GHN: `ghnq.meta_train.step_loss` + backward,
on a fixed architecture sequence (the sampler's pool at seed 0, steps --start-step ...), one input batch in
the loop's NHWC layout. Variants, interleaved in each repeat so load changes hit all alike:
  before     the kernels of the first GHN-Q runs: BN with spelled-out batch statistics, the textbook
             straight-through spelling x + (fq(x) - x).detach() for weights and activations
  fused-bn   BN through F.batch_norm (one fused kernel forward and backward)
  now        fused-bn + fake-quant built in place under a custom straight-through Function (what
             ghnq.fakequant runs)
Prints seconds per step (median over repeats) and the speed-up over `before`.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ghnq.fakequant as fq  # noqa: E402
from ghnq.cli import run_cli  # noqa: E402
from ghnq.meta_train import SpecPool, step_loss  # noqa: E402
from ghnq.model import GHNQ, GHNConfig  # noqa: E402
from ghnq.sampler import SamplerConfig  # noqa: E402

NOW_FQ_ACT, NOW_FQ_WEIGHT = fq.fq_act, fq.fq_weight


def textbook_fq_weight(w: torch.Tensor, bits: int | None) -> torch.Tensor:
    if not bits:
        return w
    qmax = 2 ** (bits - 1) - 1
    scale = (w.detach().abs().flatten(1).amax(1).clamp_min(1e-8) / qmax).view(-1, *([1] * (w.dim() - 1)))
    wq = torch.clamp(torch.round(w / scale), -qmax, qmax) * scale
    return w + (wq - w).detach()


def textbook_fq_act(x: torch.Tensor, bits: int | None, lo=None, hi=None) -> torch.Tensor:
    if not bits:
        return x
    if lo is None or hi is None:
        lo, hi = x.detach().min(), x.detach().max()
    lo = torch.clamp(torch.as_tensor(lo, dtype=x.dtype), max=0.0)
    hi = torch.clamp(torch.as_tensor(hi, dtype=x.dtype), min=0.0)
    levels = 2 ** bits - 1
    scale = ((hi - lo) / levels).clamp_min(1e-8)
    zp = torch.round(-lo / scale)
    xq = (torch.clamp(torch.round(x / scale) + zp, 0, levels) - zp) * scale
    return x + (xq - x).detach()


def fixed_work(start: int, steps: int, meta_batch: int, batch: int) -> tuple[list, list[str], torch.Tensor,
                                                                           torch.Tensor]:
    """A fixed architecture sequence, the same in every process: (each step's nets, bits, x01, y)."""
    torch.manual_seed(0)
    pool = SpecPool(0, 0, [SamplerConfig()], 2, 32)
    nets = [[(n, g) for _, n, g in pool.batch(s, meta_batch, random.Random(s))] for s in range(start, start + steps)]
    bits = (["8", "4", "float"] * meta_batch)[:meta_batch]
    # NHWC strides, as the loop's batch (uint8 NHWC images permuted to NCHW)
    x01 = torch.rand(batch, 32, 32, 3).permute(0, 3, 1, 2)
    y = torch.randint(0, 10, (batch,))
    return nets, bits, x01, y


def speed_table(times: dict[str, list[float]], base: str) -> str:
    """Markdown: median seconds per step of each variant and its speed-up over `base`."""
    ref = statistics.median(times[base])
    rows = [f"| variant | s/step (median of {len(times[base])}) | speed-up vs {base} |", "|---|---:|---:|"]
    rows += [f"| {name} | {statistics.median(ts):.2f} | {ref / statistics.median(ts):.2f}x |"
             for name, ts in times.items()]
    return "\n".join(rows)


VARIANTS = {  # name: (batch_norm_kernel, fq_act, fq_weight)
    "before": ("explicit", textbook_fq_act, textbook_fq_weight),
    "fused-bn": ("native", textbook_fq_act, textbook_fq_weight),
    "now": ("native", NOW_FQ_ACT, NOW_FQ_WEIGHT),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_meta_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="steps of the fixed architecture sequence per timing")
    p.add_argument("--start-step", type=int, default=40, help="first pool step (the pool is full after 32)")
    p.add_argument("--meta-batch", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    batches, bits, x01, y = fixed_work(a.start_step, a.steps, a.meta_batch, a.batch)
    torch.manual_seed(0)
    ghn = GHNQ(GHNConfig())
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(a.repeat):
        for name, (bn, act, weight) in VARIANTS.items():
            fq.FakeQuantNet.batch_norm_kernel, fq.fq_act, fq.fq_weight = bn, act, weight
            t0 = time.perf_counter()
            for nets in batches:
                loss, _ = step_loss(ghn, nets, bits, x01, y, True, ghn.config.hops)
                ghn.zero_grad(set_to_none=True)
                loss.backward()
            times[name].append((time.perf_counter() - t0) / len(batches))
            print(f"repeat {r + 1}/{a.repeat} {name}: {times[name][-1]:.2f} s/step", file=sys.stderr, flush=True)
    fq.FakeQuantNet.batch_norm_kernel, fq.fq_act, fq.fq_weight = "native", NOW_FQ_ACT, NOW_FQ_WEIGHT
    print(speed_table(times, "before"))
    print(f"\n{a.meta_batch} nets x {a.batch} images per step, {a.steps} steps from pool step {a.start_step}, "
          f"{a.threads} thread(s)")
    return 0


if __name__ == "__main__":
    run_cli(main)
