"""Draw random valid specs from the spec grammar: GHN-Q's training space.

Seeded and deterministic: `sample_spec(random.Random(seed))` gives the same spec on every machine.
Every drawn spec passes `validate_spec`, and its multiply-accumulate count stays under `max_macs`.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

import torch

from ghnq.spec import build_model, summarize, validate_spec

SAMPLED_NAME_PREFIX = "s-"  # every sampled spec is named s-<first 10 hex digits of its spec_hash>


@dataclass
class SamplerConfig:
    stages: tuple[int, int] = (2, 5)          # number of stages
    repeat: tuple[int, int] = (1, 3)          # blocks per stage
    stem_width: tuple[int, int] = (8, 32)
    width: tuple[int, int] = (16, 192)        # stage output channels
    max_macs: float = 60e6                    # per 32×32 image; keeps a meta-batch affordable on a CPU
    input: tuple[int, int, int] = (3, 32, 32)
    num_classes: int = 10
    # The rest of the grammar, off by default: the held-out set and every earlier run's draws stay as they were.
    stem_stride2: float = 0.0                 # chance of a stride-2 stem (ImageNet-style, like torchvision's nets)
    any_stem_kernel: bool = False             # stem kernel from every size the grammar has (1/3/5/7), not just 3/5
    head_hidden: tuple[int, ...] = (0, 0, 0, 128)  # hidden width of the classifier head (0: a single linear layer)
    geometric_widths: bool = False            # widths grow geometrically (×(hi/lo) over the net), not linearly
    blocks: tuple[str, ...] = ("conv", "sep", "mbconv", "basic", "bottleneck")  # block kinds drawn
    acts: tuple[str, ...] = ("relu", "relu6", "hardswish")  # activations drawn (a repeat weighs a choice)
    gates: tuple[str, ...] = ()               # squeeze-excite gates drawn (empty: the default, no draw)
    group_widths: tuple[int, ...] = ()        # bottleneck group widths drawn, 0 = ungrouped (empty: no draw)


# Named training spaces (`meta_train --space`). "cifar": the CIFAR-style space every held-out spec comes from.
# "grammar": also what the spec grammar allows beyond it — stride-2 stems, 1×1/7×7 stems, stages up to 512
# wide (the MAC cap narrows a draw; a stride-2 stem leaves room for width) — so GHN-Q sees nets shaped like
# torchvision's. "deep": the grammar space made deeper — up to 7 stages of up to 4 blocks, so up to ~60 layers
# like torchvision's mobile nets (the other spaces stop near 35) — with widths growing geometrically towards
# 1280 (as in mobile nets; under the MAC cap only depthwise-heavy or low-resolution stages stay that wide),
# 1024/1280-wide heads, and a stride-2 stem on every second net. "modern": the grammar space with the ops of
# EfficientNet / RegNet / ShuffleNet / ConvNeXt-style nets — SiLU and GELU activations, sigmoid squeeze-excite
# gates, grouped (ResNeXt) bottlenecks, ShuffleNet V2 units (chunk, concat, channel shuffle) — which the
# exporters handle (table ops, grouped convs, gathers) and GHN-Q's graph encodes.
SPACES: dict[str, dict] = {
    "cifar": {},
    "grammar": {"stem_stride2": 0.25, "any_stem_kernel": True, "width": (16, 512)},
    "deep": {"stem_stride2": 0.5, "any_stem_kernel": True, "width": (16, 1280), "stages": (2, 7),
             "repeat": (1, 4), "head_hidden": (0, 0, 0, 128, 1024, 1280), "geometric_widths": True},
    "modern": {"stem_stride2": 0.25, "any_stem_kernel": True, "width": (16, 512),
               "blocks": ("conv", "sep", "mbconv", "basic", "bottleneck", "shuffle"),
               "acts": ("relu", "hardswish", "silu", "silu", "gelu"), "gates": ("sigmoid",),
               "group_widths": (0, 8, 16, 32)},
}


def _round8(x: float) -> int:
    return max(8, int(round(x / 8)) * 8)


def _draw(rng: random.Random, cfg: SamplerConfig) -> dict:
    n_stages = rng.randint(*cfg.stages)
    width = _round8(rng.randint(*cfg.stem_width))
    spec: dict = {
        "input": list(cfg.input),
        "num_classes": cfg.num_classes,
        "stem": {"out": width, "kernel": rng.choice([1, 3, 3, 5, 7, 7] if cfg.any_stem_kernel else [3, 3, 5]),
                 "stride": 1, "act": rng.choice(cfg.acts)},
        "stages": [],
        "head": {"hidden": rng.choice(cfg.head_hidden), "dropout": 0.0},
    }
    lo, hi = cfg.width
    for i in range(n_stages):
        # Widths grow with depth, like every hand-designed CNN.
        frac = (i + 1) / n_stages
        if cfg.geometric_widths:
            # Like mobile nets (16, 24, 32, 64, 96, 160, 320, 1280): narrow where the maps are large, wide where
            # they are small, so the MAC cap narrows a draw less than linear growth to 1280 would.
            width = _round8(min(hi, lo * (hi / lo) ** (frac * rng.uniform(0.6, 1.0))))
        else:
            width = _round8(min(hi, max(lo, rng.uniform(lo + (hi - lo) * frac * 0.3, lo + (hi - lo) * frac))))
        block = rng.choice(cfg.blocks)
        stage: dict = {"block": block, "out": width, "kernel": rng.choice([1, 3, 3, 3, 5, 7]) if block == "conv"
                       else rng.choice([3, 3, 5, 7]),
                       "stride": 2 if (i > 0 and rng.random() < 0.6) or (i == 0 and rng.random() < 0.2) else 1,
                       "act": rng.choice(cfg.acts), "repeat": rng.randint(*cfg.repeat)}
        # Options off draw nothing, so the spaces without them (and every held-out set) draw as they always did.
        if block == "mbconv":
            stage["expand"] = rng.choice([1, 3, 4, 6])
            stage["se"] = rng.random() < 0.3
            if cfg.gates and stage["se"]:
                stage["gate"] = rng.choice(cfg.gates)
        elif block == "bottleneck":
            stage["expand"] = rng.choice([0.25, 0.5])
            if cfg.group_widths:
                stage["group_width"] = _fit_group_width(stage["out"], stage["expand"], rng.choice(cfg.group_widths))
        spec["stages"].append(stage)
    if cfg.stem_stride2 and rng.random() < cfg.stem_stride2:  # drawn last: with the option off, no draw moves
        spec["stem"]["stride"] = 2
    return spec


def spec_summary(spec: dict) -> dict:
    """`ghnq.spec.summarize` of a grammar spec (layers, parameters, MACs of one image), computed on the meta
    device: no memory, no arithmetic."""
    with torch.device("meta"):
        model = build_model(spec)
    return summarize(model, spec["input"])


def spec_macs(spec: dict) -> int:
    """MACs of one image (the sampler's budget)."""
    return spec_summary(spec)["macs"]


def _fit_group_width(out: int, expand: float, group_width: int) -> int:
    """Halve a bottleneck's group width until its middle width holds ≥ 2 groups (one whole group is a plain
    conv); 0 when not even two groups of 8 fit."""
    while group_width >= 8 and 2 * group_width > out * expand:
        group_width //= 2
    return group_width if group_width >= 8 else 0


def _shrink(spec: dict, factor: float) -> dict:
    """Scale every width by `factor` (MACs grow ~quadratically with width)."""
    spec["stem"]["out"] = _round8(spec["stem"]["out"] * factor)
    for st in spec["stages"]:
        st["out"] = _round8(st["out"] * factor)
        if st.get("group_width"):
            st["group_width"] = _fit_group_width(st["out"], st["expand"], st["group_width"])
    return spec


def sample_spec(rng: random.Random, cfg: SamplerConfig | None = None, max_tries: int = 50) -> dict:
    """One random valid spec (normalized, defaults filled) under the MAC budget.

    An over-budget draw is first narrowed (widths × sqrt(budget / MACs)) rather than thrown away, so depth
    and block choices are not biased towards tiny nets and few draws are wasted.
    """
    cfg = cfg or SamplerConfig()
    for _ in range(max_tries):
        spec = validate_spec(_draw(rng, cfg), source="<sampler>")
        for _shrinks in range(4):
            macs = spec_macs(spec)
            if macs <= cfg.max_macs:
                spec["name"] = SAMPLED_NAME_PREFIX + spec_hash(spec)[:10]
                return spec
            spec = validate_spec(_shrink(spec, 0.95 * (cfg.max_macs / macs) ** 0.5), source="<sampler>")
    raise RuntimeError(f"sampler found no spec under {cfg.max_macs:.0f} MACs in {max_tries} tries")


def spec_hash(spec: dict) -> str:
    """A content hash of the architecture (the name is ignored): identifies held-out specs."""
    body = {k: v for k, v in spec.items() if k != "name"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
