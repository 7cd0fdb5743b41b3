"""Hard activations spelled out in arithmetic, recognized as the torch functions they equal.

Widely copied MobileNetV3 code writes them by hand: `h_sigmoid(x) = relu6(x + 3) / 6` and
`h_swish(x) = x * h_sigmoid(x)` (or `x * relu6(x + 3) / 6`); EfficientNet code writes swish as `x * x.sigmoid()`,
and a ReLU6 or ReLU is often `x.clamp(0, 6)` or `x.clamp(min=0)`. Traced with torch.fx these are an add of a constant,
a clamp, a division and a product, none of which has an integer form of its own (swish: a sigmoid table, then a
product requantized again), while F.hardsigmoid, F.hardswish, F.silu, F.relu6 and F.relu do (a fused clamp, one
int8 table). `fold_spelled_activations` rewrites an fx graph in place so that
calibration lowers, and GHN-Q's graph reads, what the model means. The rewrite is exact in real arithmetic and
within a float32 rounding of the original.

Accepted spellings: x + 3 / 3 + x (operator, torch.add, .add); relu6 as nn.ReLU6, F.relu6, nn.Hardtanh(0, 6),
F.hardtanh(·, 0, 6), torch.clamp / .clamp(0, 6); / 6, torch.div(·, 6), .div(6) or * (1/6). An intermediate value
with another user is left as it is (the rest of the model reads it).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

ADDS = (operator.add, torch.add, operator.iadd)
MULS = (operator.mul, torch.mul, operator.imul)
DIVS = (operator.truediv, torch.div, torch.true_divide, operator.itruediv)


def _number(a: object) -> float | None:
    return float(a) if isinstance(a, int | float) and not isinstance(a, bool) else None


def _binary(n: fx.Node, functions: tuple, methods: tuple[str, ...]) -> tuple[object, object] | None:
    """(a, b) of `a op b` written as an operator, torch function or tensor method; None for anything else
    (keyword arguments such as alpha= or rounding_mode= change the meaning)."""
    if n.kwargs or len(n.args) != 2:
        return None
    if (n.op == "call_function" and n.target in functions) or (n.op == "call_method" and n.target in methods):
        return n.args[0], n.args[1]
    return None


def _single_use(n: object) -> bool:
    return isinstance(n, fx.Node) and len(n.users) == 1


def _plus_three(n: object) -> fx.Node | None:
    """x for a single-use `x + 3`."""
    ab = _binary(n, ADDS, ("add", "add_")) if _single_use(n) else None
    if ab is None:
        return None
    a, b = ab
    x, c = (a, b) if isinstance(a, fx.Node) else (b, a)
    return x if isinstance(x, fx.Node) and _number(c) == 3.0 else None


def _is_clamp(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in (torch.clamp, torch.clip)) or (
        n.op == "call_method" and n.target in ("clamp", "clamp_", "clip", "clip_"))


def _clamp_bounds(n: fx.Node, modules: dict[str, nn.Module]) -> tuple:
    """(lo, hi) of a clamp in any spelling (None for an open side), () for anything else."""
    if n.op == "call_module":
        m = modules.get(n.target)
        if isinstance(m, nn.ReLU6):
            return (0.0, 6.0)
        return (m.min_val, m.max_val) if isinstance(m, nn.Hardtanh) else ()
    if n.op == "call_function" and n.target is F.relu6:
        return (0.0, 6.0)
    if _is_clamp(n) or (n.op == "call_function" and n.target is F.hardtanh):
        names = ("min_val", "max_val") if n.target is F.hardtanh else ("min", "max")
        rest = list(n.args[1:3]) + [None] * (2 - len(n.args[1:3]))
        return tuple(_number(rest[i] if rest[i] is not None else n.kwargs.get(names[i])) for i in range(2))
    return ()


def _relu6_input(n: object, modules: dict[str, nn.Module]) -> fx.Node | None:
    """x for a single-use relu6(x) in any of its spellings."""
    if not _single_use(n) or _clamp_bounds(n, modules) != (0.0, 6.0):
        return None
    return n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None


def _sigmoid_input(n: object, modules: dict[str, nn.Module]) -> fx.Node | None:
    """x for a single-use sigmoid(x): nn.Sigmoid, torch.sigmoid, F.sigmoid or x.sigmoid()."""
    if _single_use(n) and ((n.op == "call_module" and isinstance(modules.get(n.target), nn.Sigmoid)) or (
            n.op == "call_function" and n.target in (torch.sigmoid, F.sigmoid)) or (
            n.op == "call_method" and n.target in ("sigmoid", "sigmoid_"))):
        return n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    return None


def _over_six(n: fx.Node) -> object | None:
    """y for `y / 6` or `y * (1/6)`."""
    ab = _binary(n, DIVS, ("div", "div_", "true_divide"))
    if ab is not None:
        return ab[0] if _number(ab[1]) == 6.0 else None
    ab = _binary(n, MULS, ("mul", "mul_"))
    if ab is not None:
        y, c = (ab[0], ab[1]) if isinstance(ab[0], fx.Node) else (ab[1], ab[0])
        c = _number(c)
        return y if c is not None and abs(c - 1 / 6) < 1e-6 else None
    return None


def _spelled_hardsigmoid(n: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """x for relu6(x + 3) / 6, `n` being the division."""
    y = _over_six(n)
    return _plus_three(_relu6_input(y, modules)) if isinstance(y, fx.Node) else None


def _hardsigmoid_input(n: object, modules: dict[str, nn.Module]) -> fx.Node | None:
    """x for a single-use hardsigmoid(x): nn.Hardsigmoid or F.hardsigmoid (spelled ones are rewritten first)."""
    if _single_use(n) and ((n.op == "call_module" and isinstance(modules.get(n.target), nn.Hardsigmoid)) or (
            n.op == "call_function" and n.target is F.hardsigmoid)):
        return n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    return None


def _replace(graph: fx.Graph, n: fx.Node, function: object, x: fx.Node, gone: set[fx.Node]) -> None:
    """`n` becomes function(x); the chain only `n` used (the add, the clamp, the division) is erased."""
    with graph.inserting_before(n):
        new = graph.call_function(function, (x,))
    new.meta = dict(n.meta)
    n.replace_all_uses_with(new)
    dead = [n]
    while dead:
        d = dead.pop()
        if d.users or d in gone:
            continue
        inputs = [a for a in d.all_input_nodes if a is not x]
        graph.erase_node(d)
        gone.add(d)
        dead += [a for a in inputs if a.op != "placeholder"]


def fold_spelled_activations(graph: fx.Graph, modules: dict[str, nn.Module]) -> int:
    """Rewrite relu6(x + 3) / 6 → F.hardsigmoid(x); x * hardsigmoid(x) or x * relu6(x + 3) / 6 → F.hardswish(x);
    x * sigmoid(x) → F.silu(x); x.clamp(0, 6) → F.relu6(x), x.clamp(min=0) → F.relu(x); in place. Returns how many
    were rewritten."""
    gone: set[fx.Node] = set()
    count = 0
    for n in list(graph.nodes):  # first the divisions: x * relu6(x + 3) / 6 and relu6(x + 3) / 6
        if n in gone:
            continue
        y = _over_six(n)
        ab = _binary(y, MULS, ("mul", "mul_")) if _single_use(y) else None
        x = next((a for a, b in (ab, ab[::-1]) if isinstance(a, fx.Node)
                  and _plus_three(_relu6_input(b, modules)) is a), None) if ab else None
        if x is not None:
            _replace(graph, n, F.hardswish, x, gone)
            count += 1
        elif (x := _spelled_hardsigmoid(n, modules)) is not None:
            _replace(graph, n, F.hardsigmoid, x, gone)
            count += 1
    for n in list(graph.nodes):  # then x * hardsigmoid(x), x * sigmoid(x), and the clamps left
        if n in gone:
            continue
        ab = _binary(n, MULS, ("mul", "mul_"))
        for inner, function in ((_hardsigmoid_input, F.hardswish), (_sigmoid_input, F.silu)):
            x = next((a for a, b in (ab, ab[::-1]) if isinstance(a, fx.Node) and inner(b, modules) is a),
                     None) if ab else None
            if x is not None:
                _replace(graph, n, function, x, gone)
                count += 1
                break
        else:
            bounds = _clamp_bounds(n, modules) if _is_clamp(n) and isinstance(n.args[0], fx.Node) else ()
            function = {(0.0, 6.0): F.relu6, (0.0, None): F.relu}.get(bounds)
            if function is not None:
                _replace(graph, n, function, n.args[0], gone)
                count += 1
    return count
