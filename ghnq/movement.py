"""Data-movement chains (view, transpose, chunk, split, indexing, ...) replayed on element indices.

    prop = ValueProp(gm); prop.propagate(x)          # shapes, plus the values of x.size() and its arithmetic
    index = replay(node, source, index, prop.values)  # run a movement node on indices instead of data
    channel_gather(index, c, h, w)                    # → the source channel of each output channel, or None
    index, channels = advance(node, source, None, (c, h, w), prop.values)  # both, at a chain's start

A ShuffleNet channel shuffle is view → transpose → contiguous → view, written with sizes read off x.size():
rather than keep a list of patterns, the chain is run on a tensor holding each element's own index, so the
result says where every value came from. Both the integer graph's lowering (calibration.convert: a `gather`
op) and GHN-Q's graph (ghnq.graph: which channel of the GHN's view each layer reads) use it.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.passes.shape_prop import _extract_tensor_metadata  # what ShapeProp stores as tensor_meta

MOVE_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "chunk", "split", "tensor_split",
                "narrow", "unflatten", "flatten", "squeeze", "unsqueeze", "swapaxes", "movedim"}
MOVE_FUNCTIONS = {torch.transpose, torch.permute, torch.reshape, torch.flatten, torch.chunk, torch.split,
                  torch.tensor_split, torch.narrow, torch.swapaxes, torch.movedim, torch.squeeze, torch.unsqueeze,
                  operator.getitem}


# What GHN-Q's graph and the training loop's fake-quant both read through: data movement, plus dropout and the
# size queries (x.size(), x.shape, x.dim()) whose ints feed views.
PASS_FUNCTIONS = MOVE_FUNCTIONS | {F.dropout, getattr}
PASS_METHODS = MOVE_METHODS | {"size", "dim"}


class ValueProp(fx.Interpreter):
    """Runs the graph once and records each node's `tensor_meta` as torch's ShapeProp does, plus the value of
    every node that holds no tensor (x.size(), x.shape, the int arithmetic on them): movement chains are replayed
    with them. Not a ShapeProp subclass: ShapeProp prints a traceback to stderr on any failure, and its callers
    here turn a failure into a named UserError (calibration) or a quiet fallback (GHN-Q's channel order)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, object] = {}

    def run_node(self, n: fx.Node) -> object:
        result = super().run_node(n)
        found = False

        def tensor_meta(value: object) -> object:
            nonlocal found
            if isinstance(value, torch.Tensor):
                found = True
                return _extract_tensor_metadata(value)
            return value

        meta = fx.node.map_aggregate(result, tensor_meta)
        if found:
            n.meta["tensor_meta"] = meta
        else:
            self.values[n] = result
        n.meta["type"] = type(result)
        return result

    def propagate(self, *args: torch.Tensor) -> object:
        return self.run(*args)


def is_movement(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in MOVE_METHODS
    return node.op == "call_function" and node.target in MOVE_FUNCTIONS


def replay(node: fx.Node, source: fx.Node, index: object, values: dict[fx.Node, object]) -> object:
    """Run a movement node on the element-index tensor(s) of its source instead of the data: the result says,
    element by element, where each value came from. Other fx arguments (sizes) take their traced values."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: index if n is source else values[n])
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def advance(node: fx.Node, first: fx.Node, index: object | None, chw: tuple[int, int, int],
            values: dict[fx.Node, object]) -> tuple[object, list[int] | None]:
    """One movement node of a chain that started at a [1, c, h, w] map: the chain's element indices after it
    (`index`: the chain's so far, None at its start) and, when they are a channel selection of that map, the
    map's channel behind each output channel (`channel_gather`), else None."""
    c, h, w = chw
    if index is None:
        index = torch.arange(c * h * w, device="cpu").view(1, c, h, w)  # CPU even under a meta default device
    index = replay(node, first, index, values)
    return index, channel_gather(index, c, h, w)


def channel_gather(index: object, c_in: int, h: int, w: int) -> list[int] | None:
    """The input channel of each output channel, when `index` (element indices into a [1, c_in, h, w] map) is
    a [1, C, h, w] map whose every channel is one whole input channel; else None."""
    if not isinstance(index, torch.Tensor) or index.dim() != 4 or index.shape[0] != 1 or \
            tuple(index.shape[2:]) != (h, w):
        return None
    channel = index[0, :, 0, 0] // (h * w)
    expect = channel.view(-1, 1, 1) * (h * w) + torch.arange(h * w, device=index.device).view(1, h, w)
    if not torch.equal(index[0], expect) or not bool(((channel >= 0) & (channel < c_in)).all()):
        return None
    return [int(c) for c in channel]
