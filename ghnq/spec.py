"""spec.yaml → nn.Module.

A spec is data: it is read with YAML's safe loader, checked key by key against the grammar below, and
built from a fixed set of blocks. Only allow-listed torchvision classification builders can be named;
nothing in a spec can import or run code. Every problem is a `SpecError` naming the file, the key path
(`stages[2].kernel`), the value and what is allowed.

Grammar (see DESIGN.md):
    name: tiny-mbv2              # optional; names the artifacts
    input: [3, 32, 32]           # C, H, W
    num_classes: 10
    stem: {out: 16, kernel: 3, stride: 1, act: relu}
    stages:
      - {block: mbconv, out: 24, kernel: 3, stride: 2, expand: 6, se: false, act: relu6, repeat: 2}
      - {block: mbconv, out: 40, kernel: 5, stride: 2, expand: 4, se: true, gate: sigmoid, act: silu}
      - {block: bottleneck, out: 64, kernel: 3, stride: 2, expand: 0.5, group_width: 8, act: gelu}
      - {block: shuffle, out: 96, kernel: 3, stride: 2, act: relu, repeat: 2}
    head: {hidden: 0, dropout: 0.0}
or
    model: torchvision.models.mobilenet_v3_small
    args: {width_mult: 0.5}

`python -m ghnq.spec FILE...` checks specs and prints a summary of each.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torchvision.models.shufflenetv2 import channel_shuffle
from torchvision.ops import Conv2dNormActivation, SqueezeExcitation

from ghnq.cli import UserError, run_cli

BLOCKS = ("conv", "sep", "mbconv", "basic", "bottleneck", "shuffle")
ACTS = ("relu", "relu6", "hardswish", "silu", "gelu", "mish", "none")  # gelu: the exact (erf) form
GATES = ("hardsigmoid", "sigmoid")  # squeeze-excite gate: MobileNetV3's or EfficientNet's
KERNELS = (1, 3, 5, 7)
STRIDES = (1, 2)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# Per block: the keys it takes beyond `block`, and their defaults (None = required).
BLOCK_KEYS: dict[str, dict[str, Any]] = {
    "conv": {"out": None, "kernel": 3, "stride": 1, "act": "relu", "repeat": 1},
    "sep": {"out": None, "kernel": 3, "stride": 1, "act": "relu", "repeat": 1},
    "mbconv": {"out": None, "kernel": 3, "stride": 1, "expand": 6, "se": False, "gate": "hardsigmoid", "act": "relu6",
               "repeat": 1},
    "basic": {"out": None, "kernel": 3, "stride": 1, "act": "relu", "repeat": 1},
    "bottleneck": {"out": None, "kernel": 3, "stride": 1, "expand": 0.25, "group_width": 0, "act": "relu",
                   "repeat": 1},
    "shuffle": {"out": None, "kernel": 3, "stride": 1, "act": "relu", "repeat": 1},
}
# Keys added after the first checkpoints were trained: a normalized spec leaves them out at their default, so
# every earlier spec keeps its spec_hash (held-out sets, sampled names and result files are keyed by it).
OMITTED_AT_DEFAULT = {"gate": "hardsigmoid", "group_width": 0}
STEM_KEYS = {"out": None, "kernel": 3, "stride": 1, "act": "relu"}
HEAD_KEYS = {"hidden": 0, "dropout": 0.0}
TOP_KEYS = ("name", "input", "num_classes", "stem", "stages", "head", "model", "args")

# torchvision classification builders a spec may name, and the `args` each accepts (name -> kind).
# `weights` is never accepted: pretrained weights come from a hub, which this toolkit never contacts.
TORCHVISION_BUILDERS: dict[str, dict[str, str]] = {
    "resnet18": {"zero_init_residual": "bool"},
    "resnet34": {"zero_init_residual": "bool"},
    "resnet50": {"zero_init_residual": "bool"},
    "mobilenet_v2": {"width_mult": "width", "dropout": "prob"},
    "mobilenet_v3_small": {"width_mult": "width", "dropout": "prob"},
    "mobilenet_v3_large": {"width_mult": "width", "dropout": "prob"},
    "mnasnet0_5": {"dropout": "prob"},
    "mnasnet1_0": {"dropout": "prob"},
    "efficientnet_b0": {"dropout": "prob", "stochastic_depth_prob": "prob"},
    "regnet_x_400mf": {},
    "regnet_y_400mf": {},
    "shufflenet_v2_x0_5": {},
    "shufflenet_v2_x1_0": {},
}


class SpecError(UserError):
    """A spec that breaks the grammar: names the file, the key path, the value and what is allowed."""

    def __init__(self, source: str, path: str, message: str):
        self.source, self.path = source, path or "(top level)"
        super().__init__(f"{source}: {self.path}: {message}")


# ----------------------------------------------------------------------------------------------------
# Loading and validation


def load_spec(path: str | Path) -> dict:
    """Read and validate a spec file; return the normalized spec (all defaults filled in)."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(source, "(file)", "no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(source, "(file)", f"cannot read: {err}") from None
    spec = parse_spec(text, source=source)
    spec.setdefault("name", _default_name(path))
    return spec


def parse_spec(text: str, source: str = "<spec>") -> dict:
    """Parse YAML text (safe loader only) and validate it."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = ""
        mark = getattr(err, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(err, "problem", None) or type(err).__name__
        raise SpecError(source, "(yaml)", f"not valid YAML{where}: {problem}; allowed: plain YAML "
                        "mappings, lists, strings and numbers (no tags)") from None
    except (ValueError, RecursionError) as err:  # e.g. absurd numbers or nesting in the YAML itself
        raise SpecError(source, "(yaml)", f"not valid YAML: {type(err).__name__}") from None
    return validate_spec(raw, source=source)


def _default_name(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "-", path.stem).strip("-.") or "model"
    return stem[:64]


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(source: str, path: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(source, path, f"got {_show(value)}; allowed: an integer in [{lo}, {hi}]")
    if not lo <= value <= hi:
        raise SpecError(source, path, f"got {value}; allowed: an integer in [{lo}, {hi}]")
    return value


def _float(source: str, path: str, value: Any, lo: float, hi: float, hi_open: bool = False) -> float:
    bracket = ")" if hi_open else "]"
    allowed = f"a number in [{lo}, {hi}{bracket}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(source, path, f"got {_show(value)}; allowed: {allowed}")
    value = float(value)
    if not (lo <= value <= hi) or (hi_open and value == hi) or value != value:
        raise SpecError(source, path, f"got {value}; allowed: {allowed}")
    return value


def _choice(source: str, path: str, value: Any, allowed: tuple) -> Any:
    ok = any(type(value) is type(a) and value == a for a in allowed)
    if not ok:
        raise SpecError(source, path, f"got {_show(value)}; allowed: {', '.join(map(str, allowed))}")
    return value


def _bool(source: str, path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SpecError(source, path, f"got {_show(value)}; allowed: true, false")
    return value


def _mapping(source: str, path: str, value: Any, keys: dict[str, Any] | tuple) -> dict:
    if value is None and not path:
        raise SpecError(source, path, "the file holds no spec (empty); allowed: a mapping with keys "
                        f"{', '.join(keys)}")
    if not isinstance(value, dict):
        raise SpecError(source, path, f"got {_show(value)}; allowed: a mapping with keys "
                        f"{', '.join(keys)}")
    for key in value:
        if not isinstance(key, str) or key not in keys:
            where = f"{path}.{key}" if path else str(key)
            raise SpecError(source, where, f"unknown key; allowed: {', '.join(keys)}")
    if isinstance(keys, dict):
        for key, default in keys.items():
            if default is None and key not in value:
                raise SpecError(source, f"{path}.{key}" if path else key, "missing; this key is required")
    return value


def _act(source: str, path: str, value: Any) -> str:
    return _choice(source, path, value, ACTS)


def validate_spec(raw: Any, source: str = "<spec>") -> dict:
    """Check a parsed spec against the grammar; return a normalized deep copy with defaults filled."""
    top = _mapping(source, "", raw, TOP_KEYS)
    spec: dict[str, Any] = {}
    if "name" in top:
        name = top["name"]
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise SpecError(source, "name", f"got {_show(name)}; allowed: 1-64 characters of letters, digits, "
                            "'_', '.', '-', starting with a letter or digit")
        spec["name"] = name
    inp = top.get("input", [3, 32, 32])
    if not isinstance(inp, list) or len(inp) != 3:
        raise SpecError(source, "input", f"got {_show(inp)}; allowed: a list [C, H, W] of 3 integers")
    spec["input"] = [_int(source, "input[0]", inp[0], 1, 64), _int(source, "input[1]", inp[1], 8, 1024),
                     _int(source, "input[2]", inp[2], 8, 1024)]
    spec["num_classes"] = _int(source, "num_classes", top.get("num_classes", 10), 2, 10000)

    if "model" in top:
        for key in ("stem", "stages", "head"):
            if key in top:
                raise SpecError(source, key, "not allowed together with `model:`; a spec names a torchvision "
                                "model or describes stem/stages/head, not both")
        spec.update(_validate_torchvision(source, top["model"], top.get("args", {})))
        return spec
    if "args" in top:
        raise SpecError(source, "args", "only allowed together with `model:`")
    if "stages" not in top:
        raise SpecError(source, "stages", "missing; a spec needs `stages:` (or `model:` naming a torchvision "
                        "builder)")

    stem = _mapping(source, "stem", top.get("stem", {"out": 16}), STEM_KEYS)
    spec["stem"] = {
        "out": _int(source, "stem.out", stem["out"], 1, 2048),
        "kernel": _choice(source, "stem.kernel", stem.get("kernel", 3), KERNELS),
        "stride": _choice(source, "stem.stride", stem.get("stride", 1), STRIDES),
        "act": _act(source, "stem.act", stem.get("act", "relu")),
    }
    stages = top["stages"]
    if not isinstance(stages, list) or not 1 <= len(stages) <= 32:
        raise SpecError(source, "stages", f"got {_show(stages)}; allowed: a list of 1 to 32 stage mappings")
    spec["stages"] = [_validate_stage(source, f"stages[{i}]", st) for i, st in enumerate(stages)]
    head = _mapping(source, "head", top.get("head", {}), HEAD_KEYS)
    spec["head"] = {
        "hidden": _int(source, "head.hidden", head.get("hidden", 0), 0, 8192),
        "dropout": _float(source, "head.dropout", head.get("dropout", 0.0), 0.0, 1.0, hi_open=True),
    }
    return spec


def _validate_stage(source: str, path: str, stage: Any) -> dict:
    if not isinstance(stage, dict):
        raise SpecError(source, path, f"got {_show(stage)}; allowed: a mapping with `block:` and its keys")
    if "block" not in stage:
        raise SpecError(source, f"{path}.block", f"missing; allowed: {', '.join(BLOCKS)}")
    block = _choice(source, f"{path}.block", stage["block"], BLOCKS)
    keys = BLOCK_KEYS[block]
    _mapping(source, path, stage, {"block": "", **keys})
    out: dict[str, Any] = {"block": block}
    for key, default in keys.items():
        value = stage.get(key, default)
        where = f"{path}.{key}"
        if key == "out":
            out[key] = _int(source, where, value, 1, 2048)
        elif key == "kernel":
            out[key] = _choice(source, where, value, KERNELS)
        elif key == "stride":
            out[key] = _choice(source, where, value, STRIDES)
        elif key == "act":
            out[key] = _act(source, where, value)
        elif key == "repeat":
            out[key] = _int(source, where, value, 1, 16)
        elif key == "se":
            out[key] = _bool(source, where, value)
        elif key == "gate":
            out[key] = _choice(source, where, value, GATES)
        elif key == "group_width":
            out[key] = _int(source, where, value, 0, 2048)
        elif key == "expand" and block == "mbconv":
            out[key] = _int(source, where, value, 1, 8)
        elif key == "expand":
            out[key] = _float(source, where, value, 0.0625, 4.0)
    if block == "shuffle" and out["out"] % 2:
        raise SpecError(source, f"{path}.out", f"got {out['out']}; allowed: an even integer (a shuffle block "
                        "splits its channels into two halves)")
    if "gate" in stage and not out["se"]:
        raise SpecError(source, f"{path}.gate", "only allowed with `se: true` (it is the squeeze-excite gate)")
    return {k: v for k, v in out.items() if k not in OMITTED_AT_DEFAULT or v != OMITTED_AT_DEFAULT[k]}


def _validate_torchvision(source: str, model: Any, args: Any) -> dict:
    prefix = "torchvision.models."
    allowed = ", ".join(prefix + b for b in TORCHVISION_BUILDERS)
    if not isinstance(model, str) or not model.startswith(prefix) or model[len(prefix):] not in TORCHVISION_BUILDERS:
        raise SpecError(source, "model", f"got {_show(model)}; allowed: {allowed}")
    builder = model[len(prefix):]
    kinds = TORCHVISION_BUILDERS[builder]
    if not isinstance(args, dict):
        keys = ", ".join(kinds) or "(none)"
        raise SpecError(source, "args", f"got {_show(args)}; allowed: a mapping with keys {keys}")
    checked: dict[str, Any] = {}
    for key, value in args.items():
        where = f"args.{key}"
        if key == "weights" or key == "pretrained":
            raise SpecError(source, where, "not allowed: pretrained weights would be downloaded from a hub; "
                            "weights come from GHN-Q, a checkpoint (--weights) or training")
        if not isinstance(key, str) or key not in kinds:
            raise SpecError(source, where, f"unknown key for {builder}; allowed: {', '.join(kinds) or '(none)'}")
        kind = kinds[key]
        if kind == "bool":
            checked[key] = _bool(source, where, value)
        elif kind == "width":
            checked[key] = _float(source, where, value, 0.1, 2.0)
        elif kind == "prob":
            checked[key] = _float(source, where, value, 0.0, 1.0, hi_open=True)
    return {"model": model, "args": checked}


# ----------------------------------------------------------------------------------------------------
# Building


def _act_layer(name: str) -> type[nn.Module] | None:
    return {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU, "gelu": nn.GELU,
            "mish": nn.Mish, "none": None}[name]


def conv_bn_act(cin: int, cout: int, kernel: int, stride: int, act: str, groups: int = 1) -> nn.Module:
    # torchvision's Conv2dNormActivation: conv (no bias, padding (k-1)//2) → BN → activation.
    # inplace=None: no `inplace` argument (nn.GELU takes none); every activation here defaults to out of place.
    return Conv2dNormActivation(cin, cout, kernel_size=kernel, stride=stride, groups=groups,
                                activation_layer=_act_layer(act), inplace=None)


class SepConv(nn.Module):
    """Depthwise k×k-BN-act, then pointwise 1×1-BN-act."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, act: str):
        super().__init__()
        self.depthwise = conv_bn_act(cin, cin, kernel, stride, act, groups=cin)
        self.pointwise = conv_bn_act(cin, cout, 1, 1, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class MBConv(nn.Module):
    """Inverted residual: 1×1 expand, depthwise k×k, optional squeeze-excite, 1×1 project (+ skip)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, se: bool, act: str,
                 gate: str = "hardsigmoid"):
        super().__init__()
        hidden = cin * expand
        self.expand = conv_bn_act(cin, hidden, 1, 1, act) if expand != 1 else nn.Identity()
        self.depthwise = conv_bn_act(hidden, hidden, kernel, stride, act, groups=hidden)
        gate_layer = {"hardsigmoid": nn.Hardsigmoid, "sigmoid": nn.Sigmoid}[gate]
        self.se = (SqueezeExcitation(hidden, max(8, hidden // 4), scale_activation=gate_layer)
                   if se else nn.Identity())
        self.project = conv_bn_act(hidden, cout, 1, 1, "none")
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class Shortcut(nn.Module):
    """Identity, or a 1×1 conv-BN projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.proj = conv_bn_act(cin, cout, 1, stride, "none") if (stride != 1 or cin != cout) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class BasicBlock(nn.Module):
    """ResNet basic block: k×k conv-BN-act, k×k conv-BN, add shortcut, act."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, act: str):
        super().__init__()
        self.conv1 = conv_bn_act(cin, cout, kernel, stride, act)
        self.conv2 = conv_bn_act(cout, cout, kernel, 1, "none")
        self.shortcut = Shortcut(cin, cout, stride)
        self.act = _act_layer(act)() if act != "none" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1×1 reduce to out·expand, k×k (strided), 1×1 to out, add shortcut, act.

    group_width > 0 makes it ResNeXt's / RegNet's: the k×k conv is grouped, `group_width` channels per group, the
    middle width rounded to a multiple of it (as torchvision's RegNet does), so any width is valid."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: float, act: str,
                 group_width: int = 0):
        super().__init__()
        mid = max(4, int(round(cout * expand)))
        if group_width:
            mid = max(group_width, int(round(mid / group_width)) * group_width)
        self.reduce = conv_bn_act(cin, mid, 1, 1, act)
        self.conv = conv_bn_act(mid, mid, kernel, stride, act, groups=mid // group_width if group_width else 1)
        self.expand = conv_bn_act(mid, cout, 1, 1, "none")
        self.shortcut = Shortcut(cin, cout, stride)
        self.act = _act_layer(act)() if act != "none" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.expand(self.conv(self.reduce(x))) + self.shortcut(x))


class ShuffleBlock(nn.Module):
    """ShuffleNet V2 unit: with stride 1 and as many channels in as out, half the channels pass through and the
    other half go through 1×1 → depthwise k×k → 1×1; otherwise (downsampling, or a width change) both halves are
    computed from the whole input (depthwise k×k → 1×1, and the three-conv branch). Concatenated, then the two
    halves' channels are interleaved (the channel shuffle)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, act: str):
        super().__init__()
        half = cout // 2
        self.split = stride == 1 and cin == cout
        self.branch1 = nn.Identity() if self.split else nn.Sequential(
            conv_bn_act(cin, cin, kernel, stride, "none", groups=cin), conv_bn_act(cin, half, 1, 1, act))
        self.branch2 = nn.Sequential(conv_bn_act(half if self.split else cin, half, 1, 1, act),
                                     conv_bn_act(half, half, kernel, stride, "none", groups=half),
                                     conv_bn_act(half, half, 1, 1, act))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split:
            x1, x2 = x.chunk(2, dim=1)
            y = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            y = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(y, 2)


def make_block(st: dict, cin: int, stride: int) -> nn.Module:
    kind, cout, k, act = st["block"], st["out"], st["kernel"], st["act"]
    if kind == "conv":
        return conv_bn_act(cin, cout, k, stride, act)
    if kind == "sep":
        return SepConv(cin, cout, k, stride, act)
    if kind == "mbconv":
        return MBConv(cin, cout, k, stride, st["expand"], st["se"], act, st.get("gate", OMITTED_AT_DEFAULT["gate"]))
    if kind == "basic":
        return BasicBlock(cin, cout, k, stride, act)
    if kind == "bottleneck":
        return Bottleneck(cin, cout, k, stride, st["expand"], act,
                          st.get("group_width", OMITTED_AT_DEFAULT["group_width"]))
    if kind == "shuffle":
        return ShuffleBlock(cin, cout, k, stride, act)
    raise ValueError(kind)  # unreachable: validate_spec checked it


class SpecNet(nn.Module):
    """The network a grammar spec describes: stem → stages → global average pool → head."""

    def __init__(self, spec: dict):
        super().__init__()
        stem = spec["stem"]
        self.stem = conv_bn_act(spec["input"][0], stem["out"], stem["kernel"], stem["stride"], stem["act"])
        blocks, cin = [], stem["out"]
        for st in spec["stages"]:
            for r in range(st["repeat"]):
                blocks.append(make_block(st, cin, st["stride"] if r == 0 else 1))
                cin = st["out"]
        self.stages = nn.Sequential(*blocks)
        head: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
        hidden = spec["head"]["hidden"]
        if hidden:
            head += [nn.Linear(cin, hidden), nn.ReLU()]
            cin = hidden
        if spec["head"]["dropout"] > 0:
            head.append(nn.Dropout(spec["head"]["dropout"]))
        head.append(nn.Linear(cin, spec["num_classes"]))
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def build_model(spec: dict) -> nn.Module:
    """Build the nn.Module a validated spec describes (random init; weights come later)."""
    if "model" in spec:
        import torchvision.models as tvm

        builder = getattr(tvm, spec["model"].split(".")[-1])
        model = builder(weights=None, num_classes=spec["num_classes"], **spec["args"])
    else:
        model = SpecNet(spec)
    model.spec = copy.deepcopy(spec)  # travels with the model: names artifacts, feeds GHN-Q bookkeeping
    return model


def spec_name(spec: dict) -> str:
    if "name" in spec:
        return spec["name"]
    if "model" in spec:
        return spec["model"].split(".")[-1]
    return "model"


# ----------------------------------------------------------------------------------------------------
# Summary


def summarize(model: nn.Module, input_shape: list[int]) -> dict:
    """Layers (conv + linear), parameters, multiply-accumulates and output shape for one image."""
    macs = 0
    layers = 0

    def hook(mod: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        nonlocal macs, layers
        layers += 1
        if isinstance(mod, nn.Conv2d):
            macs += out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            macs += out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device  # works on the meta device too (no arithmetic)
            out = model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    return {"layers": layers, "params": params, "macs": macs, "output": list(out.shape)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ghnq.spec", description="Check spec files and print a "
                                     "summary of each (layers, parameters, MACs, output shape).")
    parser.add_argument("files", nargs="+", metavar="FILE", help="spec.yaml files")
    args = parser.parse_args(argv)
    failed = 0
    for f in args.files:
        try:
            spec = load_spec(f)
            s = summarize(build_model(spec), spec["input"])
        except SpecError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        print(f"{f}: ok  name={spec['name']}  layers={s['layers']}  params={s['params']:,}  "
              f"MACs={s['macs'] / 1e6:.2f}M  output={s['output']}")
    return 2 if failed else 0


if __name__ == "__main__":
    run_cli(main)
