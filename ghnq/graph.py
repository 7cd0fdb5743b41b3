"""Any nn.Module → the computational graph GHN-Q reads.

    g = extract_graph(model)          # torch.fx trace; no hand-kept list of models
    g.nodes[i].kind                   # "conv", "dwconv", "bn", "relu", "add", "se_conv", "linear", ...
    g.edges                           # (src, dst) node indices, in execution order

Tracing gives the real data flow of whatever forward() does (residual adds, squeeze-excite products,
concatenations). Nodes that only move data (flatten, view, dropout, identity) are contracted away; nodes
holding parameters keep their module name and parameter shapes, so a predicted tensor can be written back.
Spatial sizes are propagated arithmetically (a fake-tensor shape pass costs ~0.5 s per net; this ~0 ms).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from ghnq.cli import UserError
from ghnq.movement import PASS_FUNCTIONS, PASS_METHODS, ValueProp, advance, is_movement
from ghnq.spelled import fold_spelled_activations

# Every op kind the GHN knows; the index is the embedding row. Append only (checkpoints depend on it).
KINDS = ("input", "conv", "dwconv", "gconv", "se_conv", "linear", "classifier", "bn", "relu", "relu6",
         "hardswish", "hardsigmoid", "sigmoid", "silu", "gelu", "tanh", "add", "mul", "cat", "avgpool",
         "maxpool", "gap", "other")
KIND_INDEX = {k: i for i, k in enumerate(KINDS)}
PARAM_KINDS = ("conv", "dwconv", "gconv", "se_conv", "linear", "classifier")

_ACT_MODULES: dict[type, str] = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish",
                                 nn.Hardsigmoid: "hardsigmoid", nn.Sigmoid: "sigmoid", nn.SiLU: "silu",
                                 nn.GELU: "gelu", nn.Tanh: "tanh"}
_ACT_FUNCS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.hardswish: "hardswish",
              F.hardsigmoid: "hardsigmoid", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.silu: "silu",
              F.gelu: "gelu", torch.tanh: "tanh"}
_ACT_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
# Modules / functions / methods that only move data: contracted out of the graph.
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Flatten)
# (ghnq.movement.PASS_FUNCTIONS / PASS_METHODS: channel shuffles, chunks and splits too. ShuffleNet's x.chunk →
# branch → cat → shuffle reads as the branch and the cat, as GHN-2's graphs of it do; which channels each layer
# really reads is `_channel_orders`' job.)
_PASS_METHODS = PASS_METHODS | {"expand_as", "mean_keepdim"}


@dataclass
class Node:
    """One op of the network. `module` names the nn.Module holding its parameters (param kinds only)."""

    name: str
    kind: str
    module: str | None = None
    params: dict[str, tuple[int, ...]] = field(default_factory=dict)  # predicted tensors: weight (+ bias)
    out_ch: int = 0
    in_ch: int = 0
    kernel: int = 1
    stride: int = 1
    groups: int = 1
    hw: int = 1  # spatial size of the output (height)
    flatten_area: int = 1  # a Linear reading a flattened map of this many positions: weight = params × area
    # Channel order (see `_channel_orders`): a layer reading a permuted / selected view of its GHN input reads
    # these columns of the decoded weight (dense layers); its output rows are these decoded rows (a depthwise
    # conv on such a view, or a conv added to one).
    in_index: list[int] | None = None
    out_index: list[int] | None = None


@dataclass
class Graph:
    nodes: list[Node]
    edges: list[tuple[int, int]]          # (src, dst), src executes before dst
    norms: list[str] = field(default_factory=list)  # normalization modules (set to identity by predict)

    def param_nodes(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.kind in PARAM_KINDS]


def _conv_out(h: int, m: nn.Conv2d) -> int:
    k, s, p, d = m.kernel_size[0], m.stride[0], m.padding, m.dilation[0]
    if isinstance(p, str):  # "same" / "valid"
        return h if p == "same" else (h - d * (k - 1) - 1) // s + 1
    return (h + 2 * p[0] - d * (k - 1) - 1) // s + 1


# Max / average pooling as torch spells it, modules or functions: the arguments after the input in torch's order,
# and their defaults (shared with calibration.convert, which lowers the same calls).
POOL_ARGS = {"max_pool2d": ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
             "avg_pool2d": ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")}
POOL_DEFAULTS = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False,
                 "count_include_pad": True, "divisor_override": None}
POOL_FUNCTIONS = {F.max_pool2d: "max_pool2d", torch.max_pool2d: "max_pool2d", F.avg_pool2d: "avg_pool2d"}


def pool_arguments(fxn: fx.Node, m: nn.Module | None = None, values: Callable[[fx.Node], object] | None = None
                   ) -> tuple[str, dict]:
    """("max_pool2d" | "avg_pool2d", every argument by name) of a pool module call or function call. An argument
    computed in forward (`F.avg_pool2d(x, x.size(2))`, SENet's global pool) is looked up in `values`; one it
    does not know is a UserError."""
    if m is not None:
        kind = "max_pool2d" if isinstance(m, nn.MaxPool2d) else "avg_pool2d"
        return kind, {name: getattr(m, name) for name in POOL_ARGS[kind]}
    kind = POOL_FUNCTIONS[fxn.target]
    given = dict(zip(POOL_ARGS[kind], fxn.args[1:], strict=False))  # the positional ones, then the keywords

    def value(a: fx.Node) -> object:
        v = values(a) if values is not None else None
        if v is None:
            raise UserError(f"model node {fxn.name!r}: {kind} argument {a.name!r} is computed in forward() from "
                            "something other than the input's size; give it as a number")
        return v

    return kind, fx.node.map_arg({**POOL_DEFAULTS, **given, **fxn.kwargs}, value)


def pool_size(h: int, a: dict) -> int:
    """torch's pool output size (one spatial dim): floor, or in ceil mode rounded up unless the last window
    would start past the input and its left padding."""
    first = lambda v: v if isinstance(v, int) else v[0]  # noqa: E731
    k, p = first(a["kernel_size"]), first(a["padding"])
    s = first(a["stride"] or a["kernel_size"])  # torch.max_pool2d's default stride is [] (= the kernel)
    d = first(a.get("dilation", 1))
    span = h + 2 * p - d * (k - 1) - 1
    if not a.get("ceil_mode"):
        return span // s + 1
    o = -(-span // s) + 1
    return o - 1 if (o - 1) * s >= h + p else o


def _spatial_size(n: fx.Node, hw: dict[fx.Node, int]) -> int | None:
    """The value of x.size(2|3), x.size(-1|-2), x.size()[2] or x.shape[2] from the graph's spatial sizes (nets are
    square here); None for anything else."""
    def dim(d: object) -> bool:
        return isinstance(d, int) and d in (2, 3, -1, -2)

    if n.op == "call_method" and n.target == "size" and len(n.args) == 2 and dim(n.args[1]):
        return hw.get(n.args[0])
    if n.op == "call_function" and n.target is operator.getitem and dim(n.args[1]) and isinstance(n.args[0], fx.Node):
        src = n.args[0]
        if (src.op == "call_method" and src.target == "size" and len(src.args) == 1) or (
                src.op == "call_function" and src.target is getattr and src.args[1] == "shape"):
            return hw.get(src.args[0])
    return None


def _pad_height(pad: object) -> int:
    """Rows a pad adds: torch's (left, right, top, bottom) order, or one int for all sides."""
    if isinstance(pad, int):
        return 2 * pad
    pad = list(pad) if isinstance(pad, tuple | list) else []
    return sum(p for p in pad[2:4] if isinstance(p, int))


def _pool_out(h: int, m: nn.Module) -> int:
    if isinstance(m, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
        size = m.output_size if isinstance(m.output_size, int) else m.output_size[0]
        return h if size is None else size
    return pool_size(h, pool_arguments(None, m)[1])


def _is_se(path: str, modules: dict[str, nn.Module]) -> bool:
    """A conv inside a squeeze-excite block (any class whose name says so, torchvision's included)."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        cls = type(modules.get(".".join(parts[:i]))).__name__.lower()
        if "squeeze" in cls or cls in ("se", "selayer", "seblock", "semodule"):
            return True
    return False


def trace(model: nn.Module) -> fx.GraphModule:
    """torch.fx symbolic trace (an executable GraphModule); an untraceable model is a clear UserError."""
    return fx.GraphModule(model, trace_graph(model))


def trace_graph(model: nn.Module) -> fx.Graph:
    """torch.fx symbolic trace, graph only: building a GraphModule (code generation) costs a third of the trace
    and prediction does not run the graph."""
    try:
        graph = fx.Tracer().trace(model)
    except Exception as err:  # fx raises TraceError, TypeError, NotImplementedError, ...
        raise UserError(f"GHN-Q cannot trace {type(model).__name__} with torch.fx (data-dependent control flow?): "
                        f"{type(err).__name__}: {str(err)[:160]}") from None
    fold_spelled_activations(graph, dict(model.named_modules()))  # relu6(x + 3) / 6 is a hardsigmoid
    return graph


def extract_graph(model: nn.Module, gm: fx.GraphModule | None = None, input_hw: int | None = None) -> Graph:
    """The op graph of `model` (traced with torch.fx unless `gm` is given)."""
    graph = gm.graph if gm is not None else trace_graph(model)
    modules = dict(model.named_modules())
    spec = getattr(model, "spec", None)
    if input_hw is None:
        input_hw = spec["input"][1] if isinstance(spec, dict) and "input" in spec else 32
    nodes: list[Node] = []
    edges: set[tuple[int, int]] = set()
    norms: list[str] = []
    # fx node -> indices of graph nodes producing its value (several for contracted multi-input ops)
    source: dict[fx.Node, list[int]] = {}
    hw: dict[fx.Node, int] = {}
    channels: dict[fx.Node, int] = {}  # feature channels of each value (what a Linear after a flatten reads)

    def add(fxn: fx.Node, node: Node, preds: list[int] | None = None) -> None:
        idx = len(nodes)
        nodes.append(node)
        for s in preds if preds is not None else [s for inp in fxn.all_input_nodes for s in source.get(inp, [])]:
            edges.add((s, idx))
        source[fxn] = [idx]

    def in_hw(fxn: fx.Node) -> int:
        return max([hw.get(a, 1) for a in fxn.all_input_nodes] or [1])

    def in_channels(fxn: fx.Node) -> int:
        if fxn.op == "call_function" and fxn.target in (torch.cat, torch.concat):
            return sum(channels.get(a, 0) for a in fxn.all_input_nodes)
        return max([channels.get(a, 0) for a in fxn.all_input_nodes] or [0])

    shape_nodes: set[fx.Node] = set()  # x.size() and the int arithmetic on it (view sizes): no data flows there
    for fxn in graph.nodes:
        h = in_hw(fxn)
        channels[fxn] = in_channels(fxn)
        if (fxn.op == "call_method" and fxn.target in ("size", "dim")) or (
                fxn.op == "call_function" and fxn.target is getattr and fxn.args[1] == "shape") or (
                fxn.all_input_nodes and all(a in shape_nodes for a in fxn.all_input_nodes)):
            shape_nodes.add(fxn)
            source[fxn] = []
            continue
        if fxn.op == "placeholder":
            hw[fxn] = input_hw
            channels[fxn] = 3
            add(fxn, Node(fxn.name, "input", hw=input_hw, out_ch=3))
            continue
        if fxn.op in ("output", "get_attr"):
            continue
        kind: str | None = None
        node = Node(fxn.name, "other")
        preds: list[int] | None = None
        if fxn.op == "call_module":
            m = modules[fxn.target]
            if isinstance(m, nn.Conv2d):
                h = _conv_out(h, m)
                cin, cout, g = m.in_channels, m.out_channels, m.groups
                kind = ("se_conv" if _is_se(fxn.target, modules) else
                        "conv" if g == 1 else "dwconv" if g == cin == cout else "gconv")
                node = Node(fxn.name, kind, fxn.target, {"weight": tuple(m.weight.shape)}, cout, cin,
                            m.kernel_size[0], m.stride[0], g)
                if m.bias is not None:
                    node.params["bias"] = tuple(m.bias.shape)
                channels[fxn] = cout
            elif isinstance(m, nn.Linear):
                h = 1
                kind = "linear"
                c_in, area = m.in_features, 1
                if 0 < channels[fxn] < m.in_features and m.in_features % channels[fxn] == 0:
                    # It reads a flattened C×H×W map (VGG-style), which no training net has: the GHN sees the
                    # global average pool + Linear(C) it was trained on, and the prediction is spread over the
                    # H·W positions (`Node.flatten_area`), so the layer computes exactly that function.
                    c_in, area = channels[fxn], m.in_features // channels[fxn]
                    add(fxn, Node(f"{fxn.name}_pool", "gap", hw=1))
                    preds = source[fxn]
                node = Node(fxn.name, kind, fxn.target, {"weight": (m.out_features, c_in)}, m.out_features, c_in,
                            flatten_area=area)
                if m.bias is not None:
                    node.params["bias"] = tuple(m.bias.shape)
                channels[fxn] = m.out_features
            elif isinstance(m, _NORMS):
                kind = "bn"
                norms.append(fxn.target)
            elif type(m) in _ACT_MODULES:
                kind = _ACT_MODULES[type(m)]
            elif isinstance(m, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
                h = _pool_out(h, m)
                kind = "gap" if h == 1 else ("avgpool" if isinstance(m, nn.AdaptiveAvgPool2d) else "maxpool")
            elif isinstance(m, nn.AvgPool2d | nn.MaxPool2d):
                h = _pool_out(h, m)
                kind = "avgpool" if isinstance(m, nn.AvgPool2d) else "maxpool"
            elif isinstance(m, _PASS_MODULES):
                kind = None
            elif isinstance(m, nn.ZeroPad2d | nn.ConstantPad2d):  # part of the next layer's padding, as in GHN-2
                h, kind = h + _pad_height(m.padding), None
            elif isinstance(m, nn.PReLU):  # an activation whose slopes the model keeps (GHN-Q predicts no slopes)
                kind = "other"
            elif any(True for _ in m.parameters(recurse=False)):
                raise UserError(f"GHN-Q cannot predict parameters of module '{fxn.target}' "
                                f"({type(m).__name__}); supported: Conv2d, Linear, BatchNorm/LayerNorm/GroupNorm")
            else:
                kind = "other"
        elif fxn.op == "call_function":
            f = fxn.target
            if f in _ACT_FUNCS:
                kind = _ACT_FUNCS[f]
            elif f in (operator.add, torch.add, operator.iadd):
                kind = "add"
            elif f in (operator.mul, torch.mul, operator.imul):
                kind = "mul"
            elif f in (torch.cat, torch.concat):
                kind = "cat"
            elif f in POOL_FUNCTIONS:
                kind, args = pool_arguments(fxn, values=lambda a: _spatial_size(a, hw))
                h = pool_size(h, args)
                kind = "avgpool" if kind == "avg_pool2d" else "maxpool"
            elif f in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
                size = fxn.args[1] if len(fxn.args) > 1 else fxn.kwargs.get("output_size", 1)
                h = size if isinstance(size, int) else size[0]
                kind = "gap" if h == 1 else "avgpool"
            elif f in PASS_FUNCTIONS:
                kind = None
            elif f is F.pad:
                h, kind = h + _pad_height(fxn.args[1] if len(fxn.args) > 1 else fxn.kwargs.get("pad", ())), None
            else:
                kind = "other"
        elif fxn.op == "call_method":
            if fxn.target in _ACT_METHODS:
                kind = _ACT_METHODS[fxn.target]
            elif fxn.target in ("add", "add_"):
                kind = "add"
            elif fxn.target in ("mul", "mul_"):
                kind = "mul"
            elif fxn.target == "mean":
                h, kind = 1, "gap"
            elif fxn.target in _PASS_METHODS:
                kind = None
            else:
                kind = "other"
        hw[fxn] = h
        if kind is None:  # contracted: its consumers read straight from its producers
            source[fxn] = sorted({s for a in fxn.all_input_nodes for s in source.get(a, [])})
            continue
        node.kind, node.hw = kind, h
        add(fxn, node, preds)

    if any((is_movement(n) and n.target not in _SHAPE_ONLY) or n.target in (torch.cat, torch.concat)
           for n in graph.nodes):
        channels_in = spec["input"][0] if isinstance(spec, dict) and "input" in spec else 3
        input_chw = [channels_in, input_hw, input_hw]
        runnable = gm if gm is not None else fx.GraphModule(model, graph)
        for fxn, picks in _channel_orders(runnable, graph, input_chw).items():
            for axis, index in picks.items():
                setattr(nodes[source[fxn][0]], axis, index)

    # The parameter node whose output feeds the network output is the classifier: its own embedding.
    out = next(n for n in graph.nodes if n.op == "output")
    frontier = [s for a in out.all_input_nodes for s in source.get(a, [])]
    preds: dict[int, list[int]] = {}
    for s, d in edges:
        preds.setdefault(d, []).append(s)
    seen: set[int] = set()
    while frontier:
        i = frontier.pop()
        if i in seen:
            continue
        seen.add(i)
        if nodes[i].kind in ("linear", "conv"):
            nodes[i].kind = "classifier"
            break
        frontier += preds.get(i, [])
    return Graph(nodes, sorted(edges), norms)


# Movement ops that cannot reorder channels (the flatten before a classifier, a view back to the same shape):
# a net with only these and no concat needs no channel-order pass.
_SHAPE_ONLY = {"view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze", torch.flatten, torch.reshape,
               torch.squeeze, torch.unsqueeze}


def _channel_orders(gm: fx.GraphModule, graph: fx.Graph, input_chw: list[int]
                    ) -> dict[fx.Node, dict[str, list[int]]]:
    """Where channels reach a layer in another order than the GHN's view of the net, which contracts data
    movement: ShuffleNet's channel shuffle interleaves its two halves, and the next unit's chunk reads the
    second half. GHN-Q's decoder gives every channel position its own meaning (a fixed tiled block), so a layer
    reading shuffled channels with weights decoded for the positions it sees computes noise (measured at step
    34727, float, 1,000 test images: torchvision's ShuffleNet V2 x0.5 8.4 %, specs/modern-mix.yaml 7.0 %; with
    this pass 26.6 % and 33.7 %). Instead every tensor carries the
    position of each of its channels in the GHN's view, the output row of the layer that made it (the decoder's
    row r of any layer comes from the same row of its shared channel table, so "row r" is what a consumer's
    column r learns to read): conv/linear outputs restart at 0..C-1, a concat joins its inputs' positions,
    per-channel ops (BN, activations, pools, depthwise convs) keep them, and a movement chain (replayed on
    element indices, ghnq.movement) gathers them. A dense layer then reads the decoded
    columns of those positions ("in_index"), a depthwise one takes those rows ("out_index").
    A residual add of a shuffled tensor and a conv's output (through BN / activations used once) gives that
    conv the shuffled rows too, so both addends carry the same meanings.
    {fx conv/linear node: {"in_index" / "out_index": positions}}; empty when the net does not run on `input_chw`
    (prediction then reads positions as they come)."""
    prop = ValueProp(gm)
    modes = {m: m.training for m in gm.modules()}
    gm.eval()  # a batch of one must not touch BN running statistics
    try:
        with torch.no_grad():
            device = next((t.device for t in gm.parameters()), torch.device("cpu"))  # meta models run too
            prop.propagate(torch.zeros(1, *input_chw, device=device))
    except Exception:  # prediction must not fail on a shape pass it only uses to refine channel order
        return {}
    finally:
        for m, training in modes.items():
            m.training = training
    modules = dict(gm.named_modules())
    order: dict[fx.Node, list[int]] = {}  # absent = identity
    moving: dict[fx.Node, tuple[int, int, int, object, list[int] | None]] = {}  # mid-chain: c, h, w, index, base
    found: dict[fx.Node, dict[str, list[int]]] = {}
    owner: dict[fx.Node, fx.Node] = {}  # value → the dense conv whose output rows it is (through single-use ops)

    def shape_of(n: object) -> tuple[int, ...] | None:
        meta = n.meta.get("tensor_meta") if isinstance(n, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def positions(n: fx.Node) -> list[int] | None:
        """The GHN-view positions of tensor `n`'s channels (None: identity or unknown)."""
        if n in moving:  # a chain that ended in a non-channel view: only [1, C] after a 1×1 map is known
            c, h, w, index, base = moving[n]
            if h * w == 1 and isinstance(index, torch.Tensor) and index.numel() == index.shape[-1] <= c:
                picked = [int(i) for i in index.flatten()]
                return [base[i] for i in picked] if base else picked
            return None
        return order.get(n)

    for n in graph.nodes:
        first = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        if is_movement(n) and first is not None and (first in moving or len(shape_of(first) or ()) == 4):
            if first in moving:
                c, h, w, index, base = moving[first]
            else:
                (_, c, h, w), index, base = shape_of(first), None, order.get(first)
            try:
                index, chans = advance(n, first, index, (c, h, w), prop.values)
            except Exception:
                continue
            if chans is None:
                moving[n] = (c, h, w, index, base)
            else:
                picked = [base[i] for i in chans] if base else chans
                if picked != list(range(len(picked))):
                    order[n] = picked
            continue
        tensors = [a for a in n.all_input_nodes if shape_of(a) is not None or a in moving]
        ins = [positions(a) for a in tensors]
        mod = modules.get(n.target) if n.op == "call_module" else None
        if isinstance(mod, nn.Conv2d | nn.Linear):
            if isinstance(mod, nn.Conv2d) and mod.groups > 1:
                if mod.groups == mod.in_channels == mod.out_channels and ins and ins[0]:
                    found[n] = {"out_index": ins[0]}  # depthwise: channel j keeps its input's meaning
                    order[n] = ins[0]
                continue
            if ins and ins[0] and len(ins[0]) == (mod.in_channels if isinstance(mod, nn.Conv2d) else mod.in_features):
                found[n] = {"in_index": ins[0]}
            if isinstance(mod, nn.Conv2d):
                owner[n] = n
            continue
        if n.op == "call_function" and n.target in (torch.cat, torch.concat):
            if (n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)) in (1, -3):
                parts = [i for a, pos in zip(tensors, ins, strict=True) for i in (pos or range(shape_of(a)[1]))]
                if parts != list(range(len(parts))):
                    order[n] = parts
            continue
        is_add = (n.op == "call_function" and n.target in (operator.add, torch.add, operator.iadd)) or (
            n.op == "call_method" and n.target in ("add", "add_"))  # what extract_graph calls "add"
        if is_add and len(tensors) == 2 and (ins[0] is None) != (ins[1] is None):
            pos, plain = (ins[0], tensors[1]) if ins[0] else (ins[1], tensors[0])
            conv = owner.get(plain)
            if conv is not None and len(plain.users) == 1 and "out_index" not in found.get(conv, {}) and \
                    modules[conv.target].out_channels == len(pos):
                found.setdefault(conv, {})["out_index"] = pos  # its rows now carry the shuffled meanings
                order[n] = pos
                continue
        if len(tensors) == 1 and tensors[0] in owner and len(tensors[0].users) == 1 and not ins[0]:
            owner[n] = owner[tensors[0]]  # BN, an activation: still that conv's rows, one for one
        # Everything else (BN, activations, pools, add, mul, ...) keeps channel positions: the first permuted
        # input's order (an add of two differently ordered tensors has no right answer; that one stays).
        pos = next((p for p in ins if p), None)
        if pos is not None and (shape_of(n) or (0, 0))[1:2] == (len(pos),):
            order[n] = pos
    return found


def param_count(graph: Graph) -> int:
    """Number of predicted scalars (weights + biases) in the graph."""
    total = 0
    for n in graph.nodes:
        for shape in n.params.values():
            c = 1
            for d in shape:
                c *= d
            total += c
    return total
