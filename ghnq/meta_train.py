"""Quantization-aware meta-training of GHN-Q on CIFAR-10.

    python -m ghnq.meta_train --out runs/ghnq-main                      # CPU, runs until stopped
    python -m ghnq.meta_train --out runs/ghnq-main --resume             # after any stop, kill -9 included
    python -m ghnq.meta_train --out runs/ghnq-noq --no-quant            # ablation: no quantization in the loop
    python -m ghnq.meta_train --out runs/ghnq-ft4 --init runs/ghnq-main/checkpoint.pt --bits 4,4,4a4,8 --steps 700
                                                                        # 4-bit-heavy fine-tuning of a run
    python -m ghnq.meta_train --out runs/x --device cuda --max-minutes 9 --resume     # GPU chunks
    torchrun --nproc_per_node 2 -m ghnq.meta_train --out runs/ddp       # DDP (gloo on CPU, nccl on CUDA)

Each step: draw `--meta-batch` specs from the sampler (never one of the held-out specs: checked by
spec_hash), a bit width per net from --bits, one augmented CIFAR-10 training batch shared by all nets;
the GHN predicts every net's parameters, each net runs functionally (ghnq/fakequant.py: BN folded,
per-channel symmetric weight fake-quant with STE, 8-bit activations where the integer graph has them;
"4a4" in --bits: 4-bit weights and 4-bit activations),
and the mean cross-entropy, plus a small penalty on the decoder's squared log-gains (--gain-decay, see
step_loss), backpropagates into the GHN (Adam, gradient norm clipped at 5; a step with a non-finite loss or
gradient is skipped on every rank).

Everything a step draws is a pure function of (seed, step, rank), and the checkpoint (written atomically
every --checkpoint-every seconds) holds GHN, optimizer, step and RNG state: a resumed run continues
exactly, losing at most the steps since the last checkpoint. OUT/log.jsonl gets one line per step and
one per evaluation (--eval-every: a few held-out nets, float/W8A8/W4A8, BN re-estimated); each
evaluation also leaves OUT/snapshots/step-N.pt (the shippable GHN file) for later, larger evaluations.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ghnq.cli import UserError, run_cli
from ghnq.data import cache_dir, load_cifar10
from ghnq.evaluate import calibration_images, to_x01, top1_predicted
from ghnq.fakequant import FakeQuantNet
from ghnq.fileio import atomic_torch_save, atomic_write_text, torch_load
from ghnq.graph import extract_graph
from ghnq.model import GHNQ, GHNConfig, bits_int, bits_key, collate
from ghnq.predict import SHIPPED_FORMAT, ghn_from_file_object, save_checkpoint
from ghnq.sampler import SPACES, SamplerConfig, sample_spec, spec_hash
from ghnq.spec import build_model
from ghnq.train import augment

HELDOUT_SEED = 1_000_000       # held-out spec i is sample_spec(Random(HELDOUT_SEED + i), HELDOUT_CONFIG)
HELDOUT_MAX = 200              # hashes of this many held-out specs are excluded from training
HELDOUT_CONFIG = SamplerConfig(max_macs=25e6)
CKPT_FORMAT = "ghnq-train/1"


@lru_cache(maxsize=4)
def heldout_specs(n: int, space: str = "cifar") -> list[dict]:
    """The fixed held-out set of a training space (sampler.SPACES): the first n of a seeded sequence of sampled
    specs (same on every machine). "cifar" is the set every BENCHMARKS figure was measured on.

    Cached on disk (keyed by the sampler's source, so a changed sampler redraws them): drawing takes ~0.2 s each.
    """
    import ghnq.sampler

    cfg = SamplerConfig(max_macs=HELDOUT_CONFIG.max_macs, **SPACES[space])
    key = hashlib.sha256(Path(ghnq.sampler.__file__).read_bytes()).hexdigest()[:12]
    cache = cache_dir() / f"heldout-{space}-{HELDOUT_SEED}-{cfg.max_macs:.0f}-{key}.json"
    specs: list[dict] = []
    if cache.exists():
        try:
            specs = json.loads(cache.read_text())
        except (OSError, ValueError):
            specs = []
    if len(specs) < n:
        specs += [sample_spec(random.Random(HELDOUT_SEED + i), cfg) for i in range(len(specs), n)]
        atomic_write_text(cache, json.dumps(specs))
    return specs[:n]


@lru_cache(maxsize=1)
def heldout_hashes() -> frozenset[str]:
    """Never trained on: the held-out specs of every training space."""
    return frozenset(spec_hash(s) for space in SPACES for s in heldout_specs(HELDOUT_MAX, space))


def draw_specs(rng: random.Random, n: int, cfg: SamplerConfig) -> list[dict]:
    """n training specs, skipping any held-out one."""
    excluded = heldout_hashes()
    out = []
    while len(out) < n:
        spec = sample_spec(rng, cfg)
        if spec_hash(spec) not in excluded:
            out.append(spec)
    return out


def meta_net(spec: dict) -> tuple[FakeQuantNet, object]:
    """(runner, graph) of a spec; the module lives on the meta device: only its structure is used."""
    with torch.device("meta"):
        model = build_model(spec)
    return FakeQuantNet(model), extract_graph(model)


class SpecPool:
    """A rolling pool of training nets: step s adds `fresh` new specs, each lives `window` steps.

    Sampling a spec (MAC check) and tracing it cost ~0.2 s on this CPU, a large share of a step at 8 nets
    per step, so each drawn net serves ~meta_batch·window/(fresh·window)... several steps. The pool at step t
    is a pure function of (seed, rank, t): resuming rebuilds it exactly. With several spaces (`cfgs`, one config
    per space) the new nets take turns between them, so every step's pool holds each space in equal shares.
    """

    def __init__(self, seed: int, rank: int, cfgs: list[SamplerConfig], fresh: int, window: int):
        self.seed, self.rank, self.cfgs, self.fresh, self.window = seed, rank, cfgs, fresh, window
        self.cache: dict[tuple[int, int], tuple[dict, FakeQuantNet, object]] = {}

    def _get(self, s: int, j: int) -> tuple[dict, FakeQuantNet, object]:
        if (s, j) not in self.cache:
            cfg = self.cfgs[(s * self.fresh + j) % len(self.cfgs)]  # one space: the draws of every earlier run
            spec = draw_specs(random.Random(f"{self.seed}-{self.rank}-{s}-{j}"), 1, cfg)[0]
            self.cache[(s, j)] = (spec, *meta_net(spec))
        return self.cache[(s, j)]

    def batch(self, step: int, n: int, rng: random.Random) -> list[tuple[dict, FakeQuantNet, object]]:
        for key in [k for k in self.cache if k[0] <= step - self.window]:
            del self.cache[key]
        keys = [(s, j) for s in range(max(0, step - self.window + 1), step + 1) for j in range(self.fresh)]
        return [self._get(*k) for k in rng.sample(keys, min(n, len(keys)))]


def parse_space(text: str, max_macs: float) -> list[SamplerConfig]:
    """--space: one training space (sampler.SPACES) or a mixture "a+b" whose nets take turns in the pool."""
    names = [t.strip() for t in text.split("+")]
    for name in names:
        if name not in SPACES:
            raise UserError(f"--space {text!r}: unknown space {name!r}; allowed: {', '.join(sorted(SPACES))}, "
                            "or several joined by '+' (a mixture)")
    return [SamplerConfig(max_macs=max_macs, **SPACES[name]) for name in names]


def parse_train_bits(text: str) -> list[str]:
    """--bits: weight bit widths ("float", "8", "4", "2"), or "WaA" for A-bit activations (A in 8, 4)."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        w, a = split_bits(item)
        if a not in (8, 4):
            raise UserError(f"--bits {item!r}: activation bits after 'a' must be 8 or 4")
        if a != 8 and bits_key(w) == "float":
            raise UserError(f"--bits {item!r}: quantized activations need quantized weights")
        out.append(bits_key(w) + (f"a{a}" if a != 8 else ""))
    return out


def split_bits(choice: str) -> tuple[str, int]:
    """A --bits choice ("8", "4a4", "float") → (the GHN's conditioning key, activation bits in the loop)."""
    m = re.fullmatch(r"(\w+?)a(\d+)", choice)
    return (m.group(1), int(m.group(2))) if m else (choice, 8)


def log_gains(params: dict[str, Tensor]) -> Tensor:
    """The decoder's per-layer log-gain, read back from the predicted weights: each is standardized and scaled
    by gain·sqrt(1/fan_in) (ghnq.model), so log(std·sqrt(fan_in)) recovers log(gain), gradient included."""
    ws = [w for name, w in params.items() if name.endswith(".weight") and w.dim() in (2, 4)]
    return torch.stack([torch.log(w.std(unbiased=False) * math.sqrt(w[0].numel())) for w in ws])


def step_loss(ghn: nn.Module, nets: list[tuple[FakeQuantNet, object]], bits: list[str], x01: torch.Tensor,
              y: torch.Tensor, quant: bool, hops: int, gain_decay: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy over the meta-batch (+ gain_decay · mean squared log-gain), and step statistics.

    Why the gain penalty: nearly every predicted conv feeds a BatchNorm, so its output scale is invisible to the
    loss (per-channel symmetric fake-quant is scale-equivariant too) and its gain gets only a tiny, consistent
    push from BN's eps. Adam normalizes that push to full-size steps: the log-gains drifted to 10 by step 1750
    and to 45 by step 1850 of the next run, where BN's variance overflows float32 and the nets go dead (chance
    accuracy, NaN gradients). The penalty is weight decay for the gain, as for scale-invariant weights in SGD."""
    batch = collate([g for _, g in nets], hops).to(x01.device)
    params = ghn(batch, [split_bits(b)[0] for b in bits])  # the GHN is conditioned on the weight bits only
    losses, correct = [], 0.0
    for (net, _), p, b in zip(nets, params, bits, strict=True):
        wkey, abits = split_bits(b)
        wb = bits_int(wkey) if quant else None
        logits = net(x01, p, wbits=wb, abits=abits if wb else None)
        losses.append(F.cross_entropy(logits, y))
        correct += (logits.argmax(1) == y).float().mean().item()
    ce = torch.stack(losses).mean()
    gains = torch.cat([log_gains(p) for p in params])
    loss = ce + gain_decay * gains.pow(2).mean() if gain_decay else ce
    return loss, {"acc": correct / len(nets), "ce": ce.item(), "log_gain_mean": gains.mean().item(),
                  "log_gain_max": gains.max().item()}


def evaluate_heldout(ghn: GHNQ, n_nets: int, calib: torch.Tensor, test: torch.Tensor, labels: torch.Tensor,
                     quant: bool, hops: int, space: str = "cifar") -> dict:
    """Mean held-out top-1 per bit width over the first n_nets held-out specs of `space` (small, in-loop;
    ghnq.evaluate does the full sweep)."""
    ghn.eval()
    res: dict[str, list[float]] = {"float": [], "8": [], "4": [], "4a4": []}
    with torch.no_grad():
        for spec in heldout_specs(n_nets, space):
            model = build_model(spec)
            net, graph = FakeQuantNet(model), extract_graph(model)
            batch = collate([graph], hops).to(calib.device)
            for key in res:
                wkey, abits = split_bits(key)
                params = ghn(batch, [wkey if quant else "float"])[0]
                wb = bits_int(wkey)
                res[key].append(top1_predicted(net, params, wb, abits if wb else None, calib, test, labels))
    ghn.train()
    return {k: float(np.mean(v)) for k, v in res.items()}


def export(ckpt_path: Path, dest: Path) -> int:
    """Training checkpoint → the shippable file ghnq.predict loads (no optimizer state)."""
    if not ckpt_path.is_file():
        raise UserError(f"{ckpt_path}: no training checkpoint to export")
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    ghn = GHNQ(GHNConfig(**ck["config"]))
    ghn.load_state_dict(ck["ghn"])
    save_checkpoint(dest, ghn, shipped_meta(ck["step"], ck["elapsed"], ck.get("args", {})))
    print(f"exported step {ck['step']} of {ckpt_path} to {dest} ({dest.stat().st_size / 1e6:.1f} MB)")
    return 0


def shipped_meta(step: int, elapsed: float, args: dict) -> dict:
    """The metadata of every shipped GHN file a run writes (--export, snapshots, OUT/ghnq.pt)."""
    return {"step": step, "elapsed_s": round(elapsed), "quant": not args.get("no_quant", False),
            "bits": args.get("bits"), "meta_batch": args.get("meta_batch"), "batch": args.get("batch"),
            "ranks": args.get("ranks", 1), "space": args.get("space", "cifar"),  # nets per step: ranks·meta_batch
            "max_macs": args.get("max_macs"), "lr": args.get("lr"), "decay_from": args.get("decay_from"),
            "lr_final": args.get("lr_final"), "gain_decay": args.get("gain_decay"),
            "device": args.get("device"), "heldout_seed": HELDOUT_SEED}


def update(ghn: nn.Module, opt: torch.optim.Optimizer, loss: Tensor, max_norm: float = 5.0) -> float:
    """One optimizer step with the gradient norm clipped; returns the norm (NaN when skipped).

    Skipped when the loss or any gradient is not finite: a finite loss can still backpropagate an inf/NaN
    (a 4-bit fake-quant scale underflow), and one such step writes NaN into every GHN weight for good
    (seen at step 1878 of a CPU run: every later step NaN). Under DDP every rank must run backward (that is
    where the gradients are all-reduced; a rank that returned early would leave the others waiting), so the
    loss check is all-reduced too, and the gradient norm is the same on every rank: all skip together."""
    opt.zero_grad(set_to_none=True)
    bad_loss = torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=loss.device)
    if loss.requires_grad:
        loss.backward()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(bad_loss, op=dist.ReduceOp.MAX)
    gnorm = nn.utils.clip_grad_norm_(ghn.parameters(), max_norm)
    if bad_loss.item() or not torch.isfinite(gnorm):
        opt.zero_grad(set_to_none=True)
        return math.nan
    opt.step()
    return float(gnorm)


def learning_rate(step: int, lr: float, decay_from: int | None, total: int, final: float) -> float:
    """Constant `lr`, then (from `decay_from`) a half cosine down to `final` at step `total`.

    A pure function of the step (not a torch LR scheduler with state of its own), so a run resumed from any
    checkpoint, or continued with `--init` and new flags, is at exactly the right point of its schedule."""
    if decay_from is None or step < decay_from:
        return lr
    t = min(1.0, (step - decay_from) / max(1, total - decay_from))
    return final + 0.5 * (lr - final) * (1.0 + math.cos(math.pi * t))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ghnq.meta_train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="run folder: checkpoint.pt, log.jsonl, snapshots/")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when it exists")
    ap.add_argument("--init", default=None, metavar="CKPT", help="start a new run from another run's training "
                    "checkpoint (GHN, optimizer, step count) or from a shipped GHN file (GHN, step count; fresh "
                    "optimizer): fine-tuning, e.g. 4-bit-heavy --bits")
    ap.add_argument("--steps", type=int, default=1_000_000, help="stop after this many steps in total")
    ap.add_argument("--max-minutes", type=float, default=0, help="stop (after a checkpoint) after this long")
    ap.add_argument("--meta-batch", type=int, default=8, help="nets per step (per rank)")
    ap.add_argument("--fresh", type=int, default=2, help="new sampled nets per step (rolling pool)")
    ap.add_argument("--window", type=int, default=32, help="steps a sampled net stays in the pool")
    ap.add_argument("--batch", type=int, default=64, help="images per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--decay-from", type=int, default=None, metavar="STEP",
                    help="cosine-decay the learning rate from --lr at STEP to --lr-final at --steps (default: "
                    "constant)")
    ap.add_argument("--lr-final", type=float, default=0.0, help="learning rate at --steps when --decay-from is set")
    ap.add_argument("--bits", default="float,8,4", help="bit widths drawn per net")
    ap.add_argument("--gain-decay", type=float, default=1e-2,
                    help="penalty on the decoder's squared log-gains (keeps BN-hidden scales from drifting; 0: off)")
    ap.add_argument("--no-quant", action="store_true", help="ablation: train without quantization in the loop")
    ap.add_argument("--space", default="cifar",
                    help="training space: cifar (where the held-out specs come from), grammar (also stride-2 "
                    "and 1×1/7×7 stems, stages up to 512 wide: nets shaped like torchvision's) or deep (grammar "
                    "with up to 7 stages × 4 blocks, ~60 layers like torchvision's mobile nets, widths to 1280); "
                    "a mixture such as cifar+deep draws its new nets from each in turn")
    ap.add_argument("--max-macs", type=float, default=HELDOUT_CONFIG.max_macs, help="cap per sampled net")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--checkpoint-every", type=float, default=180, help="seconds between checkpoints")
    ap.add_argument("--eval-every", type=int, default=0, help="steps between held-out evaluations (0: none)")
    ap.add_argument("--eval-space", choices=sorted(SPACES), default="cifar",
                    help="whose held-out nets --eval-every evaluates (default cifar: every earlier run's curve used "
                    "it, so runs stay comparable; each evaluation line records its space)")
    ap.add_argument("--eval-nets", type=int, default=8)
    ap.add_argument("--eval-images", type=int, default=500)
    ap.add_argument("--export", default=None, metavar="FILE",
                    help="write OUT/checkpoint.pt as a shippable GHN file (weights + config + sha256) and exit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args(argv)
    if args.decay_from is not None and not 0 <= args.decay_from < args.steps:
        raise UserError(f"--decay-from {args.decay_from}: must be a step in [0, --steps {args.steps})")
    if args.threads:
        torch.set_num_threads(args.threads)
    bits_choices = parse_train_bits(args.bits)
    space_cfgs = parse_space(args.space, args.max_macs)
    if args.no_quant:
        bits_choices = ["float"]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available on this machine")

    # DDP when launched by torchrun: every rank draws different nets, gradients are all-reduced.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    args.ranks = world  # recorded in checkpoints and shipped files: a step trains on ranks × --meta-batch nets
    device = torch.device(args.device)
    if world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    out = Path(args.out)
    ckpt_path = out / "checkpoint.pt"
    log_path = out / "log.jsonl"
    if args.export:
        return export(ckpt_path, Path(args.export))

    torch.manual_seed(args.seed)
    ghn = GHNQ(GHNConfig(hidden=args.hidden)).to(device)
    opt = torch.optim.Adam(ghn.parameters(), lr=args.lr)
    step, elapsed = 0, 0.0
    resuming = args.resume and ckpt_path.exists()
    if rank == 0 and ckpt_path.exists() and not args.resume:
        raise UserError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out")
    if resuming or args.init:
        src = ckpt_path if resuming else Path(args.init)
        if not src.is_file():
            raise UserError(f"--init {src}: no such training checkpoint")
        ck = torch_load(src, "checkpoint", device, weights_only=False)  # a training checkpoint holds RNG state
        if not isinstance(ck, dict):
            raise UserError(f"{src}: holds a {type(ck).__name__}, not a meta-training checkpoint or GHN file")
        if not resuming and ck.get("format") == SHIPPED_FORMAT:
            # A shipped GHN file (e.g. ghnq/assets/ghnq.pt): verified by its sha256, no optimizer state in it,
            # so Adam starts fresh; the step count continues from its metadata.
            shipped = ghn_from_file_object(ck, src, device=str(device))
            if shipped.config != ghn.config:
                raise UserError(f"{src}: GHN config {shipped.config.to_dict()} differs from this run's "
                                f"{ghn.config.to_dict()}")
            ghn.load_state_dict(shipped.state_dict())
            meta = shipped.meta  # snapshots written before shipped_meta existed say "elapsed"
            step, elapsed = int(meta.get("step", 0)), float(meta.get("elapsed_s", meta.get("elapsed", 0)))
        else:
            if ck.get("format") != CKPT_FORMAT:
                raise UserError(f"{src}: neither a meta-training checkpoint (a run's OUT/checkpoint.pt) nor a "
                                "shipped GHN file")
            if GHNConfig(**ck["config"]) != ghn.config:
                raise UserError(f"{src}: GHN config {ck['config']} differs from this run's {ghn.config.to_dict()}")
            ghn.load_state_dict(ck["ghn"])
            opt.load_state_dict(ck["optimizer"])
            step, elapsed = ck["step"], ck["elapsed"]
            if resuming:
                torch.set_rng_state(ck["rng_torch"])
    model: nn.Module = ghn
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(ghn, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=True)

    images, labels = load_cifar10("train", args.data_root, progress=rank == 0)
    images_t, labels_t = torch.from_numpy(images), torch.from_numpy(labels)
    quant = not args.no_quant
    pool = SpecPool(args.seed, rank, space_cfgs, args.fresh, args.window)
    if args.eval_every and rank == 0:
        calib = calibration_images(256, args.data_root).to(device)
        test_imgs, test_labels = load_cifar10("test", args.data_root, progress=False)
        from ghnq.data import interleaved_order

        order = interleaved_order(test_labels)[:args.eval_images]
        test_x, test_y = to_x01(test_imgs[order]).to(device), torch.as_tensor(test_labels[order]).to(device)

    def save() -> None:
        if rank != 0:
            return
        atomic_torch_save(ckpt_path, {"format": CKPT_FORMAT, "config": ghn.config.to_dict(), "ghn": ghn.state_dict(),
                                      "optimizer": opt.state_dict(), "step": step, "elapsed": elapsed,
                                      "rng_torch": torch.get_rng_state(), "args": vars(args)})

    def log(record: dict) -> None:
        if rank == 0:
            with open(log_path, "a") as f:  # append-only; a torn last line is skipped by readers
                f.write(json.dumps(record) + "\n")

    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    last_ckpt = time.time()
    ghn.train()
    drawn: list = []  # the last meta-batch (for the DDP sync record; empty when no step runs)
    while step < args.steps:
        t0 = time.time()
        rng = random.Random(f"{args.seed}-{step}-{rank}")
        drawn = pool.batch(step, args.meta_batch, rng)
        bits = [rng.choice(bits_choices) for _ in drawn]
        nets = [(net, graph) for _, net, graph in drawn]
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 101 + rank)
        idx = torch.randint(0, len(images_t), (args.batch,), generator=gen)
        x01 = augment(images_t[idx], gen).permute(0, 3, 1, 2).float().div(255.0).to(device)
        if device.type == "cpu":  # oneDNN's convolutions (forward and backward) are faster on NHWC here (the
            x01 = x01.contiguous(memory_format=torch.channels_last)  # permuted batch has these strides already)
        y = labels_t[idx].to(device)
        loss, stats = step_loss(model, nets, bits, x01, y, quant, ghn.config.hops, args.gain_decay)
        lr = learning_rate(step, args.lr, args.decay_from, args.steps, args.lr_final)
        for group in opt.param_groups:
            group["lr"] = lr
        gnorm = update(ghn, opt, loss)
        step += 1
        dt = time.time() - t0
        elapsed += dt
        log({"step": step, "loss": round(loss.item(), 4), "ce": round(stats["ce"], 4), "acc": round(stats["acc"], 4),
             "grad_norm": round(gnorm, 3), "log_gain_mean": round(stats["log_gain_mean"], 3),
             "log_gain_max": round(stats["log_gain_max"], 3),
             "bits": bits, "lr": lr, "sec": round(dt, 2), "elapsed": round(elapsed, 1), "time": time.time()})
        if args.eval_every and step % args.eval_every == 0 and rank == 0:
            te = time.time()
            res = evaluate_heldout(ghn, args.eval_nets, calib, test_x, test_y, quant, ghn.config.hops,
                                   args.eval_space)
            log({"step": step, "eval": res, "eval_space": args.eval_space, "eval_nets": args.eval_nets,
                 "eval_images": len(test_x),
                 "eval_sec": round(time.time() - te, 1), "elapsed": round(elapsed, 1), "time": time.time()})
            save_checkpoint(out / "snapshots" / f"step-{step:06d}.pt", ghn, shipped_meta(step, elapsed, vars(args)))
        if time.time() - last_ckpt >= args.checkpoint_every:
            save()
            last_ckpt = time.time()
        if args.max_minutes and time_is_up(t_start, args.max_minutes, world, device):
            break
    save()
    if world > 1:
        log(ddp_sync_record(ghn, drawn, world))
    if rank == 0:
        save_checkpoint(out / "ghnq.pt", ghn, shipped_meta(step, elapsed, vars(args)))
    return 0


def time_is_up(t_start: float, max_minutes: float, world: int, device: torch.device) -> bool:
    """--max-minutes reached, decided for all ranks at once: a rank that left the loop alone would leave the
    others waiting forever in the next gradient all-reduce (their clocks cross the limit steps apart)."""
    up = time.time() - t_start >= max_minutes * 60
    if world == 1:
        return up
    flag = torch.tensor([float(up)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # any rank out of time stops every rank, at this same step
    return bool(flag.item())


def ddp_sync_record(ghn: GHNQ, drawn: list, world: int) -> dict:
    """Proof that DDP did its job: every rank holds the same GHN (max abs difference to rank 0's parameters)
    although each drew different nets (the spec hashes of every rank's last meta-batch)."""
    flat = torch.cat([p.detach().flatten() for p in ghn.parameters()]).cpu()
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    hashes: list = [None] * world
    dist.all_gather_object(hashes, [spec_hash(spec) for spec, _, _ in drawn])
    return {"ddp_world": world, "ddp_max_param_diff": max(float((g - gathered[0]).abs().max()) for g in gathered),
            "ddp_last_specs": hashes}


if __name__ == "__main__":
    run_cli(main)
