"""Meta-training step time on this CPU: one process vs torchrun-style DDP ranks, same nets per step (issue 6).

    python -m benchmarks.bench_meta_ddp --steps 4 --repeat 3

One step = GHN-Q predicts a fixed meta-batch of 8 sampled nets, each runs 64 images with quantization in the
loop (bit widths 8/4/float), the mean loss backpropagates, Adam updates: `ghnq.meta_train.step_loss` and
`ghnq.meta_train.update`, on a fixed architecture sequence (the sampler's pool at seed 0, pool steps
--start-step ...). Variants, interleaved in each repeat so load changes hit all alike:
  1 proc, 1 thread       the whole meta-batch in one process on one core
  1 proc, R threads      the same, with R intra-op threads (what `--threads 0` gives on R cores)
  R ranks DDP            R gloo ranks of 1 thread each, every rank runs its share of the SAME nets, gradients
                         all-reduced (what `torchrun --nproc_per_node R -m ghnq.meta_train` does, except that
                         there each rank draws its own nets)
Before timing, the benchmark checks that the DDP ranks' averaged gradient equals the one-process gradient of the
whole meta-batch, float loss (so the ranks are doing the same work, split). Prints seconds per step (median over
repeats) and the speed-up over one process on one thread.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_meta_step import fixed_work, speed_table  # noqa: E402
from ghnq.cli import run_cli  # noqa: E402
from ghnq.meta_train import step_loss, update  # noqa: E402
from ghnq.model import GHNQ, GHNConfig  # noqa: E402


def share(items: list, rank: int, world: int) -> list:
    """This rank's contiguous share of a meta-batch (equal shares: the loss is a mean per rank, and DDP averages
    the ranks' gradients, so equal shares give the whole batch's mean)."""
    per = len(items) // world
    return items[rank * per:(rank + 1) * per]


def time_steps(model: torch.nn.Module, ghn: GHNQ, opt: torch.optim.Optimizer, work: tuple, rank: int,
               world: int) -> float:
    """Seconds per step over the fixed steps, after one untimed pass over the same steps: every variant's
    process then has its kernels' one-time set-up (oneDNN primitives per conv shape, allocator pools) behind it,
    also the DDP ranks, which are new processes in every repeat."""
    nets, bits, x01, y = work
    for _pass in ("warm-up", "timed"):  # only the last pass is returned
        t0 = time.perf_counter()
        for step_nets in nets:
            loss, _ = step_loss(model, share(step_nets, rank, world), share(bits, rank, world), x01, y, True,
                                ghn.config.hops)
            update(ghn, opt, loss)
    return (time.perf_counter() - t0) / len(nets)


def first_gradient(model: torch.nn.Module, ghn: GHNQ, work: tuple, rank: int, world: int) -> torch.Tensor:
    """The first step's gradient without quantization: with it, the GHN's batched matmuls (a different summation
    order for 8 nets than for 4) move predicted weights by ~1e-7, enough to flip a few rounding decisions and
    change the loss by ~1e-3 (measured), so only the float loss can be compared value for value."""
    nets, bits, x01, y = work
    ghn.zero_grad(set_to_none=True)
    loss, _ = step_loss(model, share(nets[0], rank, world), share(bits, rank, world), x01, y, False, ghn.config.hops)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in ghn.parameters() if p.grad is not None])


def single(work: tuple, threads: int, steps_only: bool = False) -> tuple[float, torch.Tensor | None]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ghn = GHNQ(GHNConfig())
    grad = None if steps_only else first_gradient(ghn, ghn, work, 0, 1)
    opt = torch.optim.Adam(ghn.parameters(), lr=1e-4)
    return time_steps(ghn, ghn, opt, work, 0, 1), grad


def ddp_rank(rank: int, world: int, port: str, args: argparse.Namespace, with_grad: bool, result: dict) -> None:
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        work = fixed_work(args.start_step, args.steps, args.meta_batch, args.batch)
        torch.manual_seed(0)
        ghn = GHNQ(GHNConfig())
        model = DistributedDataParallel(ghn, find_unused_parameters=args.find_unused)  # as ghnq.meta_train
        grad = first_gradient(model, ghn, work, rank, world) if with_grad else None  # DDP's all-reduced average
        opt = torch.optim.Adam(ghn.parameters(), lr=1e-4)
        dist.barrier()
        sec = time_steps(model, ghn, opt, work, rank, world)  # the ranks start each step together (all-reduce)
        if rank == 0:
            result["sec"], result["grad"] = sec, grad
    finally:
        dist.destroy_process_group()


def ddp(args: argparse.Namespace, with_grad: bool) -> tuple[float, torch.Tensor | None]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(ddp_rank, args=(args.ranks, port, args, with_grad, result), nprocs=args.ranks, join=True)
        return result["sec"], result["grad"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_meta_ddp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="steps of the fixed architecture sequence per timing")
    p.add_argument("--start-step", type=int, default=40, help="first pool step (the pool is full after 32)")
    p.add_argument("--meta-batch", type=int, default=8, help="nets per step in all, split over the ranks")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--find-unused", type=int, choices=(0, 1), default=1,
                   help="DDP's find_unused_parameters (ghnq.meta_train uses 1)")
    a = p.parse_args(argv)
    if a.ranks < 2 or a.meta_batch % a.ranks:
        p.error(f"--meta-batch {a.meta_batch} must split evenly over --ranks {a.ranks} (≥ 2)")
    work = fixed_work(a.start_step, a.steps, a.meta_batch, a.batch)
    names = ["1 proc, 1 thread", f"1 proc, {a.ranks} threads", f"{a.ranks} ranks DDP"]
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(a.repeat):
        sec1, grad1 = single(work, 1, steps_only=r > 0)
        secn, _ = single(work, a.ranks, steps_only=True)
        secd, gradd = ddp(a, with_grad=r == 0)  # the gradient check runs once, in the first repeat
        if grad1 is not None and gradd is not None:  # the split work is the same work: DDP's gradient == one process's
            err = (gradd - grad1).abs().max().item() / grad1.abs().max().item()
            print(f"DDP vs one-process gradient of the whole meta-batch: max relative difference {err:.1e}",
                  file=sys.stderr)
            # measured, 8 nets x 64 images: 3e-3 across ranks (float32 summation order), 0.75 when both
            # ranks take the same 4 nets
            if err > 1e-2:
                raise SystemExit(f"DDP gradient differs from the one-process gradient ({err:.1e}): not the same work")
        for n, s in zip(names, (sec1, secn, secd), strict=True):
            times[n].append(s)
            print(f"repeat {r + 1}/{a.repeat} {n}: {s:.2f} s/step", file=sys.stderr, flush=True)
    print(speed_table(times, names[0]))
    print(f"\n{a.meta_batch} nets x {a.batch} images per step in all, {a.steps} steps from pool step {a.start_step}, "
          f"{os.cpu_count()} CPU cores, find_unused_parameters={bool(a.find_unused)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
