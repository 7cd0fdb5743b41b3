"""Low-bit weights by evolutionary cooperative coevolution: integer weights, no gradients, no float master copy.

    python -m ghnq.evolve --arch specs/resnet20.yaml --bits 4 --init ptq --weights runs/resnet20-sgd/weights.pt \\
        --budget-evals 2000 --out out/resnet20-evolve
    python -m ghnq.evolve ... --resume        # continue a killed run from its last checkpoint

After Peng, Liu, Lu, Tang, "Training Quantized Deep Neural Networks via Cooperative Coevolution" (arXiv
2112.14834). Only the paper's abstracts (v1 and v3) were available here; what they say, we follow:
  * search the low-bit integer weights with an EA, no full-precision gradients (v3);
  * cooperative coevolution (CC) that repeatedly groups the weights by the confidence in their values and
    focuses on the least confident ones (v3);
  * an estimation-of-distribution algorithm (EDA) inside each group (v1);
  * start from a quantized pre-trained network, not a random one, and restrict the search space around it (v1).
Every other choice is ours, a flag, and its default's reason is given in `EvolveConfig`.

The algorithm
  State: a population of P integer individuals `pop` (int8 [P, n], n = all conv/fc weights of the
  QuantizedModel, in `qm.weight_keys()` order), whose member 0 is always the context vector `best` (the
  network the search currently stands on). Nothing else is searched: scales, biases, activation ranges stay
  those calibration chose. No float copy of the weights exists; the sim dequantizes a candidate's codes
  transiently, as it does for any QuantizedModel.
  Start: member 0 = the starting codes (post-training quantization, GHN-Q, or a .qm). When the float weights
  that codes came from are known (ptq, ghnq), members 1.. are stochastic roundings of them (each weight is
  floor or ceil of w/s with probability given by its distance), then the floats are dropped: the population
  then *encodes* how ambiguous each rounding was. Otherwise members 1.. are mutations of the start.
  Confidence of weight i = how many individuals agree with the context's value: conf_i = #{p: pop[p,i] = best[i]}.
  Round: the K = groups × G least confident weights (ties broken at random) are split, in network order, into
  groups of G (contiguous groups mostly lie in one layer, so the layers before it are computed once per
  group: see `PopulationFitness`). Each group is evolved in turn while all other weights stay at the context
  (CC); then confidences are recomputed and the weights regrouped (every round).
  Group evolution (UMDA, an EDA, on integers): one training mini-batch per group (so fitness values are
  comparable across its generations); the sub-population pop[:, g] is evaluated inside the context; for
  `gens` generations: the best half (elite) is the model, each offspring gene is sampled from the elite's
  marginal distribution of that weight (= the value of a random elite member), then mutated by ±1 with
  `mutation_rate`, kept within [start - radius, start + radius] ∩ [-qmax, qmax]; (μ+λ) survivor selection.
  The winner replaces the context only if it also beats the context on the *next* mini-batch (an acceptance
  check against the winner's curse of picking the luckiest of many noisy candidates).
  Fitness = cross-entropy (or error rate) of the int8 logits of the fake-quant simulation: the sim with the
  candidate's integer codes, exactly `calibration.sim.Simulator.forward(x, weights=...)` (tested bit-equal).

Budget: `--budget-evals` counts fitness evaluations, one = one individual on one mini-batch of `--batch`
images (acceptance checks included; the monitor set, see below, is not part of the budget but its forward
passes are counted in `image_forwards`). Progress: the context's loss/accuracy on a fixed monitor set of
training images after every round ("best fitness"), and optionally top-1 on test images (`--curve-images`),
are recorded in history.json. Checkpoints (atomic) every `--checkpoint-every` seconds at group boundaries,
and at the end; `--resume` continues from the last one exactly (RNG state and data stream included).
Output: OUT/<name>.qm, the starting QuantizedModel with the evolved codes (4-bit values in int8 containers),
which export/ writes directly; OUT/history.json; OUT/start.qm (the start, kept for --resume).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from calibration.qmodel import WEIGHTED_OPS, QuantizedModel, input_codes
from calibration.qmodel import load as load_qm
from calibration.qmodel import save as save_qm
from calibration.sim import Simulator
from ghnq.cli import UserError, run_cli
from ghnq.fileio import atomic_torch_save, atomic_write_text

STATE_FILE = "evolve-state.pt"
START_FILE = "start.qm"
INITS = ("ghnq", "ptq", "ckpt")


@dataclass
class EvolveConfig:
    """Every open choice of the method, with the reason for its default."""

    # P: 16 individuals. The paper's value is unknown; 16 is the smallest population whose elite (8) still
    # holds ~3 bits of diversity per weight, and the cost of a group is (gens + 1) × P evaluations.
    pop: int = 16
    # G: 512 weights per group: small enough that ±1 moves of a few of them are resolvable on one mini-batch,
    # large enough that one round covers a useful share of a 270k-weight ResNet-20.
    group_size: int = 512
    # Groups per round before regrouping: 8 (confidences change only for the weights just evolved, so
    # regrouping more often buys little; less often lets stale confidences steer the search).
    groups_per_round: int = 8
    # Generations per group: 4 (CC favours many short visits over long ones: the context the group is
    # evolved in changes after every other group).
    gens: int = 4
    # Per-gene ±1 mutation probability: 0.01 (≈ 5 genes per offspring at G = 512: exploration beyond what
    # the elite's marginals already hold, without drowning the model).
    mutation_rate: float = 0.01
    # Search-space restriction (the v1 abstract): codes stay within ±radius of the start. 1 re-decides each
    # weight's rounding (floor / ceil, as AdaRound does) plus one step; 0 = the whole [-qmax, qmax].
    radius: int = 1
    # Images per fitness mini-batch: 128 (loss differences between individuals are measured paired on the
    # same images; 128 keeps one evaluation of ResNet-20 near a second on a shared 2-core CPU).
    batch: int = 128
    # Fitness: "loss" (cross-entropy of the int8 logits) ranks individuals that differ in a few weights;
    # "error" moves in steps of 1/batch and mostly ties.
    fitness: str = "loss"
    # Acceptance check on the next mini-batch: on (see module docstring).
    accept_check: bool = True
    # Monitor set: 512 training images, evaluated after each round for the progress bar / history.
    monitor_images: int = 512
    # Initial population: "sr" (stochastic rounding of the float weights, when known) or "mutate".
    init_pop: str = "sr"
    # Requantization of the fitness simulation: "float" (round(acc · s_in·s_w/s_out), the sim's textbook
    # mode) costs a third of "tflite" (the bit-exact fixed-point multiplier in int64) on CPU and differs from
    # it by at most one code on rare ties. Reported accuracies (curve, start, final) always use "tflite".
    rounding: str = "float"
    seed: int = 0

    def check(self) -> None:
        if self.pop < 2:
            raise UserError(f"--pop {self.pop}: need at least 2 individuals")
        if self.group_size < 1 or self.groups_per_round < 1 or self.gens < 1 or self.batch < 1:
            raise UserError("--group-size, --groups-per-round, --gens and --batch must be ≥ 1")
        if not 0.0 <= self.mutation_rate <= 1.0:
            raise UserError(f"--mutation-rate {self.mutation_rate}: must be in [0, 1]")
        if self.radius < 0:
            raise UserError(f"--radius {self.radius}: must be ≥ 0 (0 = unrestricted)")
        if self.fitness not in ("loss", "error"):
            raise UserError(f"--fitness {self.fitness!r}; allowed: loss, error")
        if self.init_pop not in ("sr", "mutate"):
            raise UserError(f"--init-pop {self.init_pop!r}; allowed: sr, mutate")
        if self.rounding not in ("float", "tflite"):
            raise UserError(f"--rounding {self.rounding!r}; allowed: float, tflite")

    def group_cost(self) -> int:
        """Fitness evaluations one group costs at most."""
        return self.pop * (self.gens + 1) + (2 if self.accept_check else 0)


# ----------------------------------------------------------------------------------------------------
# Weights as one flat integer vector


@dataclass
class Layout:
    """Where each weight tensor of the QuantizedModel lives in the flat int8 vector."""

    keys: list[str]
    shapes: list[tuple[int, ...]]
    offsets: list[int]
    n: int
    qmax: int
    owner: np.ndarray = field(repr=False, default=None)  # flat index → layer number

    @staticmethod
    def of(qm: QuantizedModel) -> Layout:
        keys = qm.weight_keys()
        if not keys:
            raise UserError("the QuantizedModel has no conv / fully_connected weights to evolve")
        shapes = [tuple(qm.tensors[k].data.shape) for k in keys]
        sizes = [math.prod(s) for s in shapes]
        offsets = list(np.cumsum([0] + sizes[:-1]))
        bits = {qm.tensors[k].bits for k in keys}
        if len(bits) != 1:
            raise UserError(f"weights have mixed bit widths {sorted(bits)}; evolve needs one")
        owner = np.repeat(np.arange(len(keys)), sizes)
        return Layout(keys, shapes, [int(o) for o in offsets], int(sum(sizes)), qm.tensors[keys[0]].qmax, owner)

    def flat(self, qm: QuantizedModel) -> torch.Tensor:
        return torch.cat([torch.from_numpy(qm.tensors[k].data).reshape(-1) for k in self.keys]).to(torch.int8)

    def tensor(self, flat: torch.Tensor, layer: int) -> torch.Tensor:
        """Layer `layer`'s codes from a flat vector [..., n] → [..., *shape] (a view)."""
        o, s = self.offsets[layer], self.shapes[layer]
        return flat[..., o:o + math.prod(s)].reshape(*flat.shape[:-1], *s)


# ----------------------------------------------------------------------------------------------------
# Batched fitness: a whole population in one pass of the simulation


def exact_dtype(qm: QuantizedModel, qmax: int) -> torch.dtype:
    """float32 when every conv/fc accumulator is an integer below 2^24 in magnitude for any weight codes in
    [-qmax, qmax] (so float32 holds it, and every partial sum, exactly), else float64 (the sim's default)."""
    for op in qm.ops:
        if op.kind not in WEIGHTED_OPS:
            continue
        w, b = qm.tensors[op.inputs[1]], qm.tensors[op.inputs[2]]
        fan_in = math.prod(w.shape[1:])
        x_span = 255  # |q_x - zp_x| ≤ 255 for int8 activations
        if fan_in * qmax * x_span + int(np.abs(b.data.astype(np.int64)).max(initial=0)) >= 2 ** 24:
            return torch.float64
    return torch.float32


class PopulationFitness:
    """The QuantizedModel's simulation for P individuals that differ only in some layers, in one pass.

    Why not `Simulator.forward` per individual: the layers before the first changed one are the same for
    all P, so they are computed once (cached per mini-batch), and the rest runs with the population folded
    into the batch axis ([P·B, ...]): one batched op per layer instead of P. It executes the sim's own op
    list with the sim's own per-op kernel (`Simulator._op`: exact integer accumulators, TFLite
    requantization), so it is the sim, driven differently; a changed layer runs that kernel once per
    individual on its slice. The sim holds codes in float64; here float32 is used when it is provably exact
    (every conv/fc accumulator bound Σ|q_w|·max|q_x - zp| + |q_b| below 2^24 for any codes the search may
    choose), which is faster and gives the same integers. tests/test_evolve.py checks the logits are
    bit-identical to `Simulator.forward(x, weights=...)`.
    """

    def __init__(self, qm: QuantizedModel, layout: Layout, device: str | torch.device = "cpu",
                 chunk_images: int = 2048, rounding: str = "tflite"):
        self.qm, self.layout = qm, layout
        self.sim = Simulator(qm, device, dtype=exact_dtype(qm, layout.qmax), rounding=rounding)
        self.device, self.dtype = self.sim.device, self.sim.dtype
        self.chunk_images = chunk_images
        self.op_of_layer = [next(i for i, op in enumerate(qm.ops) if op.inputs[1:2] == [k]) for k in layout.keys]
        self.last_use: dict[str, int] = {}
        for i, op in enumerate(qm.ops):
            for n in op.inputs:
                self.last_use[n] = i
        self.last_use[qm.output] = len(qm.ops)
        self.out_scale, self.out_zp = qm.output_qparams()
        # a model that ends in softmax outputs probabilities: its fitness scores their logarithm, not a softmax of them
        self.probabilities = qm.producer(qm.output).kind == "softmax"
        self._cache: tuple[Any, int, dict[str, torch.Tensor]] | None = None
        self._context = [torch.from_numpy(qm.tensors[k].data.copy()) for k in layout.keys]

    def set_context(self, flat: torch.Tensor) -> None:
        """Make the int8 codes `flat` [n] the network every unchanged layer uses (the CC context vector)."""
        if flat.dtype != torch.int8:
            raise TypeError(f"weights must stay integer-typed (int8), got {flat.dtype}")
        for k, key in enumerate(self.layout.keys):
            codes = self.layout.tensor(flat, k)
            if not torch.equal(codes, self._context[k]):
                self.sim.consts[key] = codes.to(self.device, self.dtype)  # the sim keeps codes in its dtype
                self._context[k] = codes.clone()
                self._cache = None

    def _run(self, i: int, args: list[torch.Tensor]) -> torch.Tensor:
        # codes are small integers: casting the op's result back to the working dtype is exact (the float
        # requantization multiplies by float64 scales and would otherwise promote everything after it)
        return self.sim._op(self.qm.ops[i], self.sim.params[i], args).to(self.dtype)

    def _prefix(self, batch_id: Any, x_codes: torch.Tensor, first: int) -> dict[str, torch.Tensor]:
        """Codes of every tensor of ops[:first] on one mini-batch that is still needed later, cached."""
        if self._cache is not None and self._cache[0] == batch_id and self._cache[1] == first:
            return self._cache[2]
        env = {self.qm.input: x_codes.to(self.device, self.dtype).permute(0, 3, 1, 2)}
        for i, op in enumerate(self.qm.ops[:first]):
            env[op.outputs[0]] = self._run(i, [env[n] if n in env else self.sim.consts[n] for n in op.inputs])
            for n in op.inputs:
                if self.last_use.get(n) == i and n in env and n != self.qm.output:
                    del env[n]
        env = {n: v for n, v in env.items() if self.last_use.get(n, -1) >= first}
        self._cache = (batch_id, first, env)
        return env

    @torch.no_grad()
    def logit_codes(self, x_codes: torch.Tensor, codes: dict[int, torch.Tensor], batch_id: Any = None) -> torch.Tensor:
        """int8 NHWC input codes [B, H, W, C], {layer: int8 codes [P, *shape]} → int8 logit codes [P, B, classes]."""
        P = next(iter(codes.values())).shape[0] if codes else 1
        B = x_codes.shape[0]
        batch_id = batch_id if batch_id is not None else object()  # None: never reuse a cache
        step = max(1, self.chunk_images // B)
        if step < P:  # bound memory: at most chunk_images images at a time
            return torch.cat([self.logit_codes(x_codes, {k: v[i:i + step] for k, v in codes.items()}, batch_id)
                              for i in range(0, P, step)])
        ops = self.qm.ops
        first = min((self.op_of_layer[k] for k in codes), default=len(ops))
        shared = self._prefix(batch_id, x_codes, first)
        changed = {self.op_of_layer[k]: codes[k].to(self.device, self.dtype) for k in codes}
        env: dict[str, torch.Tensor] = {}  # population-batched codes [P·B, ...]

        def get(name: str) -> torch.Tensor:
            if name in env:
                return env[name]
            if name in self.sim.consts:
                return self.sim.consts[name]
            v = shared[name]
            return v.repeat(P, *([1] * (v.dim() - 1))) if P > 1 else v

        for i in range(first, len(ops)):
            op = ops[i]
            if i in changed:
                x_name, _, b_name = op.inputs
                xs = env[x_name].chunk(P) if x_name in env else [shared[x_name]] * P
                b = self.sim.consts[b_name]
                y = torch.cat([self._run(i, [xs[p], changed[i][p], b]) for p in range(P)])
            else:
                y = self._run(i, [get(n) for n in op.inputs])
            env[op.outputs[0]] = y
            for n in op.inputs:
                if self.last_use.get(n) == i and n in env:
                    del env[n]  # free [P·B, ...] activations as soon as they are dead
        q = env[self.qm.output] if first < len(ops) else shared[self.qm.output]
        return q.to(torch.int8).reshape(P, B, -1)

    def fitness(self, x_codes: torch.Tensor, labels: torch.Tensor, codes: dict[int, torch.Tensor],
                kind: str = "loss", batch_id: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(fitness to minimize [P], accuracy [P]) of each individual on one mini-batch."""
        q = self.logit_codes(x_codes, codes, batch_id)
        logits = (q.to(torch.float32) - self.out_zp) * self.out_scale
        if self.probabilities:  # log p as the scores (code 0, p < half a step, counts as half a step)
            logits = torch.log(logits.clamp_min(self.out_scale / 2))
        P, B, C = logits.shape
        y = labels.to(logits.device)
        loss = F.cross_entropy(logits.reshape(P * B, C), y.repeat(P), reduction="none").view(P, B).mean(1)
        acc = (logits.argmax(-1) == y).float().mean(1)
        return (loss if kind == "loss" else 1.0 - acc).cpu(), acc.cpu()


def top1(qm: QuantizedModel, images: np.ndarray, labels: np.ndarray, device: str = "cpu", bs: int = 250,
         rounding: str = "tflite") -> float:
    """Top-1 of a QuantizedModel in its simulation (uint8 NHWC images; default: the bit-exact TFLite mode)."""
    pf = PopulationFitness(qm, Layout.of(qm), device, rounding=rounding)
    x, y = torch.from_numpy(input_codes(images)), torch.from_numpy(np.asarray(labels, np.int64))
    hits = 0
    for i in range(0, len(y), bs):
        q = pf.logit_codes(x[i:i + bs], {})[0]
        hits += int((q.cpu().argmax(1) == y[i:i + bs]).sum())
    return hits / max(1, len(y))


# ----------------------------------------------------------------------------------------------------
# The search


def with_codes(qm: QuantizedModel, layout: Layout, flat: torch.Tensor, meta: dict | None = None) -> QuantizedModel:
    """A copy of `qm` whose weight codes are `flat` (int8 [n])."""
    if flat.dtype != torch.int8:
        raise TypeError(f"weights must stay integer-typed (int8), got {flat.dtype}")
    out = copy.deepcopy(qm)
    for i, k in enumerate(layout.keys):
        out.tensors[k].data = layout.tensor(flat, i).numpy().astype(np.int8).copy()
    out.meta.update(meta or {})
    out.validate()
    return out


def initial_population(start: torch.Tensor, layout: Layout, cfg: EvolveConfig, gen: torch.Generator,
                       ratio: torch.Tensor | None = None) -> torch.Tensor:
    """int8 [P, n]: member 0 = start; the rest stochastic roundings of `ratio` (= w / s, float, used here only
    and then dropped) or ±1 mutations of the start."""
    P, n = cfg.pop, layout.n
    pop = start.unsqueeze(0).repeat(P, 1)
    if P == 1:
        return pop
    if ratio is not None and cfg.init_pop == "sr":
        lo = torch.floor(ratio)
        up = torch.rand((P - 1, n), generator=gen, dtype=torch.float64) < (ratio - lo)
        rest = (lo + up).clamp(-layout.qmax, layout.qmax).to(torch.int8)
    else:
        rest = mutate(pop[1:], start, layout, cfg, gen, rate=max(cfg.mutation_rate, 0.05))
    pop[1:] = rest
    return pop


def bounds(start: torch.Tensor, layout: Layout, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = layout.qmax
    if radius == 0:
        return torch.full_like(start, -q), torch.full_like(start, q)
    s = start.to(torch.int16)
    return (s - radius).clamp(-q, q).to(torch.int8), (s + radius).clamp(-q, q).to(torch.int8)


def mutate(sub: torch.Tensor, start: torch.Tensor, layout: Layout, cfg: EvolveConfig, gen: torch.Generator,
           rate: float | None = None) -> torch.Tensor:
    """±1 steps with probability `rate` per gene, kept in the search space (all int8)."""
    rate = cfg.mutation_rate if rate is None else rate
    hit = torch.rand(sub.shape, generator=gen) < rate
    step = torch.where(torch.rand(sub.shape, generator=gen) < 0.5, -1, 1).to(torch.int8)
    lo, hi = bounds(start, layout, cfg.radius)
    out = sub + torch.where(hit, step, torch.zeros_like(step))
    return torch.maximum(torch.minimum(out, hi), lo)


def make_groups(pop: torch.Tensor, best: torch.Tensor, cfg: EvolveConfig, gen: torch.Generator) -> list[torch.Tensor]:
    """The least confident weights, split in network order into groups of G."""
    P, n = pop.shape
    conf = (pop == best).sum(0).to(torch.int64)  # 0..P agree with the context
    tie = torch.randperm(n, generator=gen)
    order = torch.argsort(conf * n + tie)
    k = min(n, cfg.group_size * cfg.groups_per_round)
    chosen = torch.sort(order[:k]).values
    return list(torch.split(chosen, cfg.group_size))


class DataStream:
    """Seeded mini-batches of training images, epoch after epoch; its position is part of the checkpoint."""

    def __init__(self, n: int, batch: int, gen: torch.Generator):
        self.n, self.batch = n, min(batch, n)
        self.perm = torch.randperm(n, generator=gen)
        self.pos, self.count = 0, 0

    def next(self, gen: torch.Generator) -> tuple[int, torch.Tensor]:
        if self.pos + self.batch > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=gen), 0
        idx = self.perm[self.pos:self.pos + self.batch]
        self.pos += self.batch
        self.count += 1
        return self.count, idx

    def state(self) -> dict:
        return {"perm": self.perm.clone(), "pos": self.pos, "count": self.count}

    def load(self, s: dict) -> None:
        self.perm, self.pos, self.count = s["perm"], s["pos"], s["count"]


class Search:
    """The CC/EDA search state and its steps (see module docstring). All weight state is int8."""

    def __init__(self, qm: QuantizedModel, images: np.ndarray, labels: np.ndarray, cfg: EvolveConfig,
                 device: str = "cpu", ratio: torch.Tensor | None = None,
                 test: tuple[np.ndarray, np.ndarray] | None = None):
        cfg.check()
        self.qm, self.cfg = qm, cfg
        self.layout = Layout.of(qm)
        self.fit = PopulationFitness(qm, self.layout, device, rounding=cfg.rounding)
        self.device = device
        self.x = torch.from_numpy(input_codes(images))
        self.y = torch.from_numpy(np.asarray(labels, np.int64))
        self.test = test  # (uint8 images, labels) scored after each round for the curve
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.start = self.layout.flat(qm)
        self.pop = initial_population(self.start, self.layout, cfg, self.gen, ratio)
        self.best = self.start.clone()
        m = min(cfg.monitor_images, len(self.y))
        self.monitor = torch.randperm(len(self.y), generator=self.gen)[:m]
        self.data = DataStream(len(self.y), cfg.batch, self.gen)
        self.round, self.groups, self.gi = 0, [], 0
        self.evals, self.image_forwards, self.accepted, self.tried = 0, 0, 0, 0
        self.wall = 0.0
        self.history: list[dict] = []
        self.best_fitness: dict | None = None
        self.last_group: dict = {}
        self._measures = 0

    # -- fitness of candidates: sub-individuals for the weights `g`, inside the context
    def _codes(self, g: torch.Tensor, sub: torch.Tensor) -> dict[int, torch.Tensor]:
        """{layer: int8 [P, *shape]}: the context with `sub` (int8 [P, |g|]) written at `g`."""
        P = sub.shape[0]
        full = self.best.unsqueeze(0).repeat(P, 1)
        full[:, g] = sub
        layers = np.unique(self.layout.owner[g.numpy()])
        return {int(k): self.layout.tensor(full, int(k)) for k in layers}

    def evaluate(self, g: torch.Tensor, sub: torch.Tensor, batch: tuple[int, torch.Tensor]) -> torch.Tensor:
        bid, idx = batch
        f, _ = self.fit.fitness(self.x[idx], self.y[idx], self._codes(g, sub), self.cfg.fitness, batch_id=bid)
        self.evals += sub.shape[0]
        self.image_forwards += sub.shape[0] * len(idx)
        return f

    def measure(self, codes: torch.Tensor, x: torch.Tensor, y: torch.Tensor, bs: int = 256) -> tuple[float, float]:
        """(mean loss, top-1) of one network (int8 [n]) on a set, in batches."""
        losses, accs = [], []
        whole = {k: self.layout.tensor(codes, k).unsqueeze(0) for k in range(len(self.layout.keys))}
        self._measures += 1
        for i in range(0, len(y), bs):
            f, a = self.fit.fitness(x[i:i + bs], y[i:i + bs], whole, "loss", batch_id=("measure", self._measures, i))
            losses.append(float(f[0]) * len(y[i:i + bs]))
            accs.append(float(a[0]) * len(y[i:i + bs]))
        self.fit._cache = None
        return sum(losses) / len(y), sum(accs) / len(y)

    def record(self) -> dict:
        loss, acc = self.measure(self.best, self.x[self.monitor], self.y[self.monitor])
        self.image_forwards += len(self.monitor)
        entry = {"round": self.round, "evals": self.evals, "image_forwards": self.image_forwards,
                 "wall_s": round(self.wall, 1), "monitor_loss": loss, "monitor_acc": acc,
                 "accepted": self.accepted, "tried": self.tried,
                 "changed_weights": int((self.best != self.start).sum())}
        if self.test is not None:  # reported in the sim's exact TFLite mode, whatever the fitness uses
            entry["test_acc"] = top1(with_codes(self.qm, self.layout, self.best), *self.test, device=self.device)
        self.history.append(entry)
        self.best_fitness = {"loss": loss, "acc": acc}
        return entry

    def evolve_group(self, g: torch.Tensor) -> dict:
        cfg, P = self.cfg, self.cfg.pop
        mu = max(1, P // 2)
        batch = self.data.next(self.gen)
        sub = self.pop[:, g].clone()
        sub[0] = self.best[g]  # member 0 is the context
        fit = self.evaluate(g, sub, batch)
        ctx_fit = float(fit[0])
        start_sub = self.start[g]
        for _ in range(cfg.gens):
            elite = sub[torch.argsort(fit, stable=True)[:mu]]
            pick = torch.randint(0, mu, (P, len(g)), generator=self.gen)
            child = torch.gather(elite, 0, pick)  # UMDA: each gene from the elite's marginal of that weight
            child = mutate(child, start_sub, self.layout, cfg, self.gen)
            cfit = self.evaluate(g, child, batch)
            allsub, allfit = torch.cat([sub, child]), torch.cat([fit, cfit])
            keep = torch.argsort(allfit, stable=True)[:P]  # (μ+λ); ties keep parents
            sub, fit = allsub[keep], allfit[keep]
        win = sub[0]
        accepted = False
        if float(fit[0]) < ctx_fit and bool((win != self.best[g]).any()):
            self.tried += 1
            ok = True
            if cfg.accept_check:
                check = self.evaluate(g, torch.stack([self.best[g], win]), self.data.next(self.gen))
                ok = bool(check[1] < check[0])
            if ok:
                self.best[g] = win
                self.fit.set_context(self.best)
                self.accepted += 1
                accepted = True
        if not accepted:
            sub[0] = self.best[g]
        self.pop[:, g] = sub
        assert self.pop.dtype == torch.int8 and self.best.dtype == torch.int8
        layer = self.layout.keys[int(self.layout.owner[int(g[0])])]
        self.last_group = {"best": float(fit[0]), "mean": float(fit.mean()), "context": ctx_fit,
                           "layer": layer, "accepted": accepted}
        return self.last_group

    # -- checkpoint
    def state(self) -> dict:
        return {"format": "ghnq-evolve/1", "cfg": asdict(self.cfg), "pop": self.pop.clone(), "best": self.best.clone(),
                "start": self.start.clone(), "monitor": self.monitor.clone(), "data": self.data.state(),
                "rng": self.gen.get_state(), "round": self.round, "groups": [g.clone() for g in self.groups],
                "gi": self.gi, "evals": self.evals, "image_forwards": self.image_forwards, "accepted": self.accepted,
                "tried": self.tried, "wall": self.wall, "history": self.history, "best_fitness": self.best_fitness}

    def load_state(self, s: dict) -> None:
        if s.get("format") != "ghnq-evolve/1":
            raise UserError(f"checkpoint format {s.get('format')!r}; this build reads 'ghnq-evolve/1'")
        if not torch.equal(s["start"], self.start):
            raise UserError("checkpoint does not belong to this start model (start codes differ)")
        self.pop, self.best, self.monitor = s["pop"], s["best"], s["monitor"]
        self.data.load(s["data"])
        self.gen.set_state(s["rng"])
        self.round, self.groups, self.gi = s["round"], list(s["groups"]), s["gi"]
        self.evals, self.image_forwards = s["evals"], s["image_forwards"]
        self.accepted, self.tried, self.wall = s["accepted"], s["tried"], s["wall"]
        self.history, self.best_fitness = s["history"], s["best_fitness"]
        self.fit.set_context(self.best)

    def run(self, budget: int, checkpoint: Any = None, every_s: float = 300.0, progress: bool = True) -> None:
        """Evolve until `budget` fitness evaluations; `checkpoint(state)` at group boundaries every `every_s`."""
        cfg = self.cfg
        if self.best_fitness is None:
            self.record()
        bar = tqdm(total=budget, initial=min(self.evals, budget), desc="evolve", unit="eval", disable=not progress,
                   dynamic_ncols=True)
        bar.set_postfix_str(self._postfix())
        last_ckpt = time.monotonic()
        t0 = time.monotonic()
        wall0 = self.wall
        while self.evals + cfg.group_cost() <= budget:
            if self.gi >= len(self.groups):
                if self.groups:  # a round ended: record, then regroup by the new confidences
                    self.wall = wall0 + time.monotonic() - t0
                    self.record()
                    self.round += 1
                self.groups, self.gi = make_groups(self.pop, self.best, cfg, self.gen), 0
            before = self.evals
            self.evolve_group(self.groups[self.gi])
            self.gi += 1
            self.wall = wall0 + time.monotonic() - t0
            bar.update(self.evals - before)
            bar.set_postfix_str(self._postfix())
            if checkpoint is not None and time.monotonic() - last_ckpt >= every_s:
                checkpoint(self.state())
                last_ckpt = time.monotonic()
        bar.close()
        if self.history and self.history[-1]["evals"] != self.evals:
            self.record()
        self.wall = wall0 + time.monotonic() - t0
        if checkpoint is not None:
            checkpoint(self.state())

    def _postfix(self) -> str:
        b = self.best_fitness or {}
        g = self.last_group
        s = f"best {b.get('loss', float('nan')):.4f} (acc {b.get('acc', float('nan')):.3f})"
        if g:
            s += f" | group {g['best']:.4f}/{g['mean']:.4f} r{self.round} g{self.gi}/{len(self.groups)} {g['layer']}"
        return s


# ----------------------------------------------------------------------------------------------------
# Start models


def start_model(arch: str, bits: int, init: str, weights: str | None, calib: np.ndarray, seed: int = 0,
                progress: bool = True) -> tuple[QuantizedModel, torch.Tensor | None, str]:
    """(starting QuantizedModel, w/s ratios when the float weights are known, description)."""
    if init not in INITS:
        raise UserError(f"--init {init!r}; allowed: {', '.join(INITS)}")
    if init == "ckpt":
        if not weights:
            raise UserError("--init ckpt needs --weights FILE.qm (a QuantizedModel, e.g. from calibration or evolve)")
        qm = load_qm(weights)
        bw = {qm.tensors[k].bits for k in qm.weight_keys()}
        if bw != {bits}:
            raise UserError(f"{weights}: weights are {sorted(bw)}-bit but --bits {bits}")
        return qm, None, f"QuantizedModel {weights}"
    from calibration import calibrate
    from calibration.convert import float_graph, fold_input_normalization
    from ghnq.spec import build_model, load_spec

    model = build_model(load_spec(arch))
    if init == "ptq":
        if not weights:
            raise UserError("--init ptq needs --weights FILE (float state_dict or ghnq.train checkpoint)")
        from ghnq.train import load_weights

        load_weights(model, weights)
        src, bn = f"PTQ of {weights}", None  # re-estimated only if the file holds placeholder BN statistics
    else:
        from ghnq.weights import ghnq_checkpoint

        ckpt = ghnq_checkpoint()
        if ckpt is None:
            raise UserError("--init ghnq: no GHN-Q checkpoint is shipped in this build (ghnq/assets/ghnq.pt missing); "
                            "use --init ptq --weights FILE or --init ckpt --weights FILE.qm")
        from ghnq.predict import predict

        predict(model, bits=bits, checkpoint=ckpt)
        src, bn = f"GHN-Q prediction ({ckpt.name})", True  # predicted nets carry fresh BN statistics
    qm = calibrate(model, calib, weight_bits=bits, bn_recalibrate=bn, progress=progress,
                   meta={"weights": src})
    g = float_graph(model.eval(), [calib.shape[3], calib.shape[1], calib.shape[2]])
    fold_input_normalization(g)
    layout = Layout.of(qm)
    ratio = torch.cat([(g.params[k].double() / torch.from_numpy(qm.tensors[k].scale).double()
                        .view(-1, *([1] * (g.params[k].dim() - 1)))).reshape(-1) for k in layout.keys])
    return qm, ratio, src


# ----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = EvolveConfig()
    p = argparse.ArgumentParser(prog="python -m ghnq.evolve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", required=True, metavar="SPEC", help="spec.yaml of the model")
    p.add_argument("--bits", type=int, default=4, choices=(2, 4), help="weight bits (default 4); activations int8")
    p.add_argument("--init", default="ptq", choices=INITS,
                   help="ptq: post-training quantization of --weights (float); ghnq: of the shipped GHN-Q "
                        "prediction; ckpt: --weights is a .qm QuantizedModel (default ptq)")
    p.add_argument("--weights", metavar="FILE", help="float weights (ptq) or a .qm file (ckpt)")
    p.add_argument("--budget-evals", type=int, required=True, metavar="N",
                   help="fitness evaluations (one individual on one mini-batch)")
    p.add_argument("--out", metavar="DIR", help="output folder (default out/<name>-evolve-w<bits>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/evolve-state.pt")
    p.add_argument("--checkpoint-every", type=float, default=300.0, metavar="S", help="seconds (default 300)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--data-root", metavar="DIR", help="CIFAR-10 JPEG root")
    p.add_argument("--train-images", type=int, default=0, metavar="N",
                   help="use the first N training images of a fixed shuffle (default: all 50,000)")
    p.add_argument("--calib-images", type=int, default=512, metavar="N", help="training images for calibration")
    p.add_argument("--eval-images", type=int, default=2000, metavar="N",
                   help="test images for the start/final top-1 in the report (0 = skip; default 2000)")
    p.add_argument("--curve-images", type=int, default=0, metavar="N",
                   help="test images scored after every round for the accuracy-vs-evaluations curve (default 0)")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("method (defaults and their reasons: ghnq/evolve.py EvolveConfig)")
    g.add_argument("--pop", type=int, default=d.pop, help=f"population size (default {d.pop})")
    g.add_argument("--group-size", type=int, default=d.group_size, help=f"weights per group (default {d.group_size})")
    g.add_argument("--groups-per-round", type=int, default=d.groups_per_round,
                   help=f"groups evolved between regroupings (default {d.groups_per_round})")
    g.add_argument("--gens", type=int, default=d.gens, help=f"generations per group visit (default {d.gens})")
    g.add_argument("--mutation-rate", type=float, default=d.mutation_rate, help=f"per gene (default {d.mutation_rate})")
    g.add_argument("--radius", type=int, default=d.radius, help=f"codes stay within ±R of the start; 0 = free "
                   f"(default {d.radius})")
    g.add_argument("--batch", type=int, default=d.batch, help=f"images per fitness mini-batch (default {d.batch})")
    g.add_argument("--fitness", default=d.fitness, choices=("loss", "error"), help=f"default {d.fitness}")
    g.add_argument("--accept-check", action=argparse.BooleanOptionalAction, default=d.accept_check,
                   help="winner must also beat the context on the next mini-batch (default on)")
    g.add_argument("--monitor-images", type=int, default=d.monitor_images, help=f"default {d.monitor_images}")
    g.add_argument("--init-pop", default=d.init_pop, choices=("sr", "mutate"), help=f"default {d.init_pop}")
    g.add_argument("--rounding", default=d.rounding, choices=("float", "tflite"),
                   help=f"requantization of the fitness sim (default {d.rounding})")
    g.add_argument("--seed", type=int, default=d.seed)
    return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> EvolveConfig:
    return EvolveConfig(pop=args.pop, group_size=args.group_size, groups_per_round=args.groups_per_round,
                        gens=args.gens, mutation_rate=args.mutation_rate, radius=args.radius, batch=args.batch,
                        fitness=args.fitness, accept_check=args.accept_check, monitor_images=args.monitor_images,
                        init_pop=args.init_pop, rounding=args.rounding, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config_from(args)
    cfg.check()
    if args.budget_evals < cfg.group_cost():  # the search spends its budget a whole group at a time
        raise UserError(f"--budget-evals {args.budget_evals}: one group costs {cfg.group_cost()} fitness evaluations "
                        f"(--pop {cfg.pop} × (--gens {cfg.gens} + 1){' + 2 acceptance checks' * cfg.accept_check}); "
                        f"allowed: at least {cfg.group_cost()}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device available; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    from ghnq.data import check_channels, check_labels, fit_images, load_cifar10, load_eval_images
    from ghnq.spec import load_spec, spec_name

    if not args.resume:  # refuse bad input before loading any data
        if args.init in ("ptq", "ckpt") and not args.weights:
            raise UserError(f"--init {args.init} needs --weights FILE"
                            f"{'.qm' if args.init == 'ckpt' else ' (float state_dict or ghnq.train checkpoint)'}")
        if args.weights and not Path(args.weights).is_file():
            raise UserError(f"--weights {args.weights}: no such file")
        if args.init == "ghnq":
            from ghnq.weights import ghnq_checkpoint

            if ghnq_checkpoint() is None:
                raise UserError("--init ghnq: no GHN-Q checkpoint is shipped in this build (ghnq/assets/ghnq.pt "
                                "missing); use --init ptq --weights FILE or --init ckpt --weights FILE.qm")

    spec = load_spec(args.arch)
    where = f"{args.arch}: input"
    check_channels(spec["input"][0], where)
    check_labels(spec["num_classes"], f"{args.arch}: num_classes")
    name = spec_name(spec)
    out = Path(args.out or f"out/{name}-evolve-w{args.bits}")
    state_path, start_path = out / STATE_FILE, out / START_FILE
    if state_path.exists() and not args.resume:
        raise UserError(f"{state_path} exists: pass --resume to continue it, or choose another --out")
    if args.resume and not (state_path.exists() and start_path.exists()):
        raise UserError(f"--resume: no checkpoint in {out} ({STATE_FILE} and {START_FILE} needed)")

    images, labels = load_cifar10("train", args.data_root, progress=not args.no_progress)
    order = np.random.default_rng(args.seed).permutation(len(labels))
    if args.train_images:
        order = order[:args.train_images]
    images, labels = fit_images(images[order], spec["input"], where), labels[order]
    test = None
    if args.curve_images or args.eval_images:
        timgs, tlabels, _ = load_eval_images(max(args.curve_images, args.eval_images), args.data_root)
        timgs = fit_images(timgs, spec["input"], where)
    if args.curve_images:
        test = (timgs[:args.curve_images], tlabels[:args.curve_images])

    ratio = None
    if args.resume:
        qm = load_qm(start_path)
        src = qm.meta.get("weights", "?")
    else:
        qm, ratio, src = start_model(args.arch, args.bits, args.init, args.weights, images[:args.calib_images],
                                     args.seed, progress=not args.no_progress)
        if ratio is None and cfg.init_pop == "sr":
            print("note: no float weights behind this start (--init ckpt): initial population by mutation",
                  file=sys.stderr)
        save_qm(qm, start_path)
    search = Search(qm, images, labels, cfg, args.device, ratio, test)
    del ratio  # the floats are gone: from here on the weights exist only as int8 codes
    if args.resume:
        search.load_state(torch.load(state_path, weights_only=False))
        print(f"resumed {state_path}: round {search.round}, {search.evals} evals, best fitness "
              f"{search.best_fitness['loss']:.6f} (acc {search.best_fitness['acc']:.4f})", file=sys.stderr)

    search.run(args.budget_evals, lambda s: atomic_torch_save(state_path, s), args.checkpoint_every,
               progress=not args.no_progress)

    report: dict[str, Any] = {"spec": name, "bits": args.bits, "init": args.init, "start": src, "config": asdict(cfg),
                              "evals": search.evals, "image_forwards": search.image_forwards,
                              "wall_s": round(search.wall, 1), "accepted_groups": search.accepted,
                              "changed_weights": int((search.best != search.start).sum()), "n_weights": search.layout.n,
                              "start_fitness": search.history[0], "final_fitness": search.history[-1]}
    result = with_codes(qm, search.layout, search.best)
    if args.eval_images:  # in the sim's exact TFLite mode
        report["test_images"] = min(args.eval_images, len(tlabels))
        report["start_test_top1"] = top1(qm, timgs[:args.eval_images], tlabels[:args.eval_images], args.device)
        report["final_test_top1"] = top1(result, timgs[:args.eval_images], tlabels[:args.eval_images], args.device)
    meta = {"evolve": {k: v for k, v in report.items() if k not in ("start_fitness", "final_fitness")}}
    result.meta.update(meta)
    path = save_qm(result, out / f"{name}.qm")
    atomic_write_text(out / "history.json", json.dumps({"report": report, "history": search.history}, indent=1))
    print(json.dumps({k: report[k] for k in report if k not in ("config", "start_fitness", "final_fitness")}))
    print(f"wrote {path} (to a device: python -m export.tflite --qm {path})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
