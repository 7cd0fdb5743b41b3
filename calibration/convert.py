"""Float nn.Module → QuantizedModel: trace, fold BN, fold the input normalization, observe, quantize.

Steps (each one a function below, read top to bottom):
  1. `float_graph`: torch.fx trace (SpecNet and the allow-listed torchvision nets trace as they are), fold
     every conv → BN pair, then lower the fx graph to the QuantizedModel's op list in float: each fx node
     becomes one op, an alias (Identity, Dropout) or an activation that is fused into its producer
     (relu / relu6 into conv / fc / add, else a standalone clamp; hardsigmoid folded into the conv / fc before
     it, see qmodel.py);
     a chain of data-movement nodes (view, transpose, chunk, ...) is replayed on element indices and becomes
     one `gather` when it ends in a channel selection (ShuffleNet's shuffle and split).
     Anything else is a UserError naming the node and the supported set.
  2. `fold_input_normalization`: the graph input becomes (pixel - 128) / 255; (x − MEAN) / STD moves into the
     first conv's float weights and bias.
  3. `observe`: run the float graph on calibration images, one observer per activation tensor.
  4. `quantize`: per-channel symmetric weights, int32 biases, activation qparams (with TFLite's sharing
     rules), into a QuantizedModel.
`calibrate()` in calibration/__init__.py chains them (after optional BN re-estimation).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.ops import stochastic_depth
from tqdm import tqdm

from calibration import observers
from calibration.bn import fold_conv_bn, fold_weights
from calibration.qmodel import (
    CLAMP_OPS,
    INPUT_SCALE,
    INPUT_ZERO_POINT,
    WEIGHT_BITS,
    WEIGHTED_OPS,
    Op,
    QuantizedModel,
    Tensor,
    softmax_qparams,
)
from calibration.reference import nearest_source_index, softmax_exp_table
from calibration.sim import run_ops
from ghnq.cli import UserError
from ghnq.data import MEAN, STD
from ghnq.graph import POOL_FUNCTIONS, pool_arguments
from ghnq.movement import ValueProp, advance, is_movement
from ghnq.spelled import fold_spelled_activations

SUPPORTED = ("Conv2d (regular, grouped or depthwise), Linear, BatchNorm2d (folded into a Conv2d before it, else a "
             "1×1 depthwise conv), BatchNorm1d right after a Linear (folded), "
             "ReLU (fused into the layer before it, else a standalone clamp), "
             "ReLU6 (or Hardtanh(0, 6)), Hardswish (or x * relu6(x + 3) / 6), Sigmoid, SiLU, Tanh, LeakyReLU, "
             "ELU, SELU, CELU, GELU, Mish, Softplus, Softsign, PReLU, Hardtanh / clamp (any bounds), "
             "Hardsigmoid (or relu6(x + 3) / 6) right after a Conv2d/Linear, softmax over the features of [N, C], "
             "tensor + / - tensor, "
             "tensor * tensor, a number times / divided into / added to / subtracted from a Conv2d / Linear / BN "
             "output (folded into its weights), AdaptiveAvgPool2d / AdaptiveMaxPool2d (an output that divides the "
             "input or is a multiple of it), Upsample / F.interpolate (nearest, whole factors), mean "
             "over H,W (or over W, then H), MaxPool2d / AvgPool2d (modules or "
             "functions, ceil_mode, count_include_pad), ZeroPad2d / ConstantPad2d(value 0) / F.pad with zeros, "
             "Flatten/flatten/reshape/view/squeeze to [N, features] (read by Linear) and back to [N, C, 1, 1], "
             "torch.cat along channels, "
             "view/transpose/permute/chunk/split/indexing chains that select channels of a 4-D map (channel "
             "shuffles, chunks, slices), Identity, Dropout (any), StochasticDepth")
FUSABLE = (*WEIGHTED_OPS, "add")
# identities at inference (a functional dropout is one as fx traced it: `training=self.training` is False in eval)
DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
# Ops that commute with relu / relu6 (they move or pick values, a max keeps order, a pad writes real 0)
CLAMP_COMMUTES = ("max_pool2d", "pad", "reshape", "gather", "resize_nearest")
SHARES_INPUT_QPARAMS = ("max_pool2d", "avg_pool2d", *CLAMP_OPS, "pad", "reshape", "gather", "resize_nearest")


@dataclass
class FloatGraph:
    """The QuantizedModel's op list with float constants, before any quantization."""

    ops: list[Op]
    params: dict[str, torch.Tensor]  # float weights (torch layout) and biases
    shapes: dict[str, list[int]]  # activation tensor → logical NHWC shape (batch 1)
    input: str
    output: str
    sources: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# 1. trace and lower


class _Tracer(fx.Tracer):
    # torchvision's Conv2dNormActivation / SqueezeExcitation are traced through; nothing is a leaf
    # except torch.nn's own layers (fx's default), so every op we see is a standard module or function.
    pass


def trace(model: nn.Module) -> fx.GraphModule:
    model = copy.deepcopy(model).eval()
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # fx raises many types for untraceable Python control flow
        raise UserError(f"cannot trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err}); "
                        f"supported: models built only from {SUPPORTED}") from None
    fold_spelled_activations(graph, dict(model.named_modules()))  # relu6(x + 3) / 6 is a hardsigmoid
    return fx.GraphModule(model, graph)


def _pair(v: int | tuple | list) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(e) for e in v]


def _conv_padding(m: nn.Conv2d) -> list[int]:
    if m.padding_mode != "zeros":
        raise UserError(f"Conv2d padding_mode={m.padding_mode!r} not supported; allowed: 'zeros'")
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return [0, 0, 0, 0]
        # 'same' (stride 1): the odd extra row/column goes at the end, as torch does
        tot = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size, strict=True)]
        return [tot[0] // 2, tot[0] - tot[0] // 2, tot[1] // 2, tot[1] - tot[1] // 2]
    ph, pw = m.padding
    return [ph, ph, pw, pw]


def _nhwc(shape: torch.Size) -> list[int]:
    s = [1, *shape[1:]]
    return [s[0], s[2], s[3], s[1]] if len(s) == 4 else s


def float_graph(model: nn.Module, input_chw: list[int]) -> FloatGraph:
    """Trace `model`, fold BN, and lower it to float ops (see module docstring)."""
    gm = fold_conv_bn(trace(model))
    prop = ValueProp(gm)
    try:
        prop.propagate(torch.zeros(1, *input_chw))
    except Exception as err:
        raise UserError(f"model does not run on input [1, {', '.join(map(str, input_chw))}] "
                        f"({type(err).__name__}: {err})") from None
    modules = dict(gm.named_modules())
    ops: list[Op] = []
    params: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    name_of: dict[fx.Node, str] = {}  # fx node → tensor name (aliases map to their input's name)
    # fx node mid-way through a data-movement chain → (the 4-D tensor it started from, element-index tensor(s))
    moving: dict[fx.Node, tuple[str, object]] = {}
    # fx node that averaged a 4-D map over one of H, W → (the map, that dim, keepdim): its reader must average the other
    half_means: dict[fx.Node, tuple[str, int, bool]] = {}
    input_name = output_name = None

    def fail(node: fx.Node, what: str) -> UserError:
        where = node.target if node.op == "call_module" else node.name
        return UserError(f"model node {where!r}: {what} is not supported by the integer graph; supported: "
                         f"{SUPPORTED}")

    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        if node.op == "placeholder":
            if input_name is not None:
                raise fail(node, "a second model input")
            input_name = node.name
            name_of[node] = node.name
            shapes[node.name] = _nhwc(shape)
            continue
        if node.op == "output":
            arg = node.args[0]
            if not isinstance(arg, fx.Node) or arg not in name_of:
                raise fail(node, "a model output that is not one tensor (or not a channel selection of a 4-D map)")
            output_name = name_of[arg]
            continue
        if node.op == "get_attr":
            if node.users and all(_prelu_weight(u) is node for u in node.users):
                continue  # F.prelu's slopes (a subclassed nn.PReLU traces to this): the prelu op's attrs
            raise fail(node, "a parameter used directly in forward()")
        first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        flatten = node.target in ("view", "reshape", "flatten", torch.reshape, torch.flatten) and \
            shape is not None and len(shape) == 2  # keeps its own lowering: the `reshape` op read by Linear
        if is_movement(node) and first is not None and (
                first in moving or (first in name_of and len(shapes[name_of[first]]) == 4 and not flatten)):
            source = moving[first][0] if first in moving else name_of[first]
            _, h, w, c = shapes[source]
            try:
                index, channels = advance(node, first, moving[first][1] if first in moving else None, (c, h, w),
                                          prop.values)
            except Exception as err:
                raise fail(node, f"{node.target} ({type(err).__name__}: {err})") from None
            if channels is None and _is_flatten(index, c * h * w):  # squeeze(-1).squeeze(-1) of a pooled map
                ops.append(Op("reshape", [source], [node.name], {"shape": [1, c * h * w]}, source=node.name))
                name_of[node] = node.name
                shapes[node.name] = [1, c * h * w]
            elif channels is None:
                if isinstance(index, torch.Tensor) and index.dim() < 2:
                    what = getattr(node.target, "__name__", node.target)
                    raise fail(node, f"{what} dropping the batch dimension (at batch 1, x.squeeze() does; write "
                                     "x.flatten(1) or x.squeeze(-1).squeeze(-1))")
                moving[node] = (source, index)
            elif channels == list(range(c)):
                name_of[node] = source
            else:
                ops.append(Op("gather", [source], [node.name], {"axis": 3, "indices": channels}, source=node.name))
                name_of[node] = node.name
                shapes[node.name] = [1, h, w, len(channels)]
            continue
        if shape is None:
            if node in prop.values:
                continue  # shape arithmetic (x.size(), x.shape, //) feeding a view: replayed from its value
            raise fail(node, f"{node.op} {node.target} (no tensor output)")
        nodes_read: list[fx.Node] = []  # every fx node in args and kwargs, lists included (cat), in order
        fx.node.map_arg((node.args, node.kwargs), nodes_read.append)
        dims = _mean_dims(node)
        if dims and dims[0] in ([2], [3]) and first in name_of and len(shapes[name_of[first]]) == 4:
            half_means[node] = (name_of[first], dims[0][0], dims[1])  # x.mean(3).mean(2): the other half next
            continue
        if first in half_means:  # the second half of a global average written as two means
            source, d, keep = half_means.pop(first)
            if dims != ([2] if not keep else [5 - d], keep) or len(nodes_read) != 1:
                raise fail(node, f"reading {first.name!r}, a mean over one of H, W of {source!r}, other than by a mean "
                                 "over the other one with the same keepdim")
            ops.append(Op("mean", [source], [node.name], {"axes": [1, 2], "keepdims": keep}, source=node.name))
            name_of[node] = node.name
            shapes[node.name] = _nhwc(shape)
            continue
        for a in nodes_read:
            if a in half_means:
                raise fail(node, f"reading {a.name!r}, a mean over only one of H, W (supported: a global average, "
                                 "also as x.mean(3).mean(2))")
            if a in moving:
                raise fail(node, f"reading {a.name!r}, a view / transpose / chunk of {moving[a][0]!r} whose result "
                           "is not a channel selection of a 4-D map of the same height and width")
        ins = [name_of[a] for a in nodes_read if a in name_of]
        affine = _scalar_affine(node, prop.values)
        if affine is not None:  # y = s · layer(x) + t (residual scaling, `x / 2`): into the layer's weights and bias
            x, (s, t) = affine
            p = next((op for op in reversed(ops) if op.outputs[0] == name_of.get(x)), None)
            if p is None or p.kind not in WEIGHTED_OPS or name_of[x] != x.name or len(x.users) != 1:
                raise fail(node, f"{getattr(node.target, '__name__', node.target)} with a constant operand, other than "
                                 "right after a Conv2d / Linear / BatchNorm2d whose only reader it is (its weights and "
                                 "bias take the constant)")
            wk, bk = p.inputs[1], p.inputs[2]
            params[wk] = (params[wk].double() * s).float()
            params[bk] = (params[bk].double() * s + t).float()
            name_of[node] = name_of[x]
            continue
        mod = modules.get(node.target) if node.op == "call_module" else None
        target = node.target
        kind, attrs = _lower(node, mod, target, fail, prop.values.get)
        src = node.target if node.op == "call_module" else node.name
        if kind == "alias":
            name_of[node] = ins[0]
            continue
        pre_pad = attrs.pop("pre_pad", None)
        if pre_pad:  # a pool that averages its zero padding in: an explicit pad op first (see _pool)
            padded = f"{node.name}/pre_pad"
            ops.append(Op("pad", ins[:1], [padded], {"padding": pre_pad}, source=str(src)))
            _, h, w, c = shapes[ins[0]]
            shapes[padded] = [1, h + pre_pad[0] + pre_pad[1], w + pre_pad[2] + pre_pad[3], c]
            ins = [padded]
        if kind in WEIGHTED_OPS:
            if isinstance(mod, nn.BatchNorm2d):  # the identity 1×1 depthwise conv with the BN folded in
                w, b = fold_weights(torch.ones(mod.num_features, 1, 1, 1), None, mod)
            else:
                w = mod.weight.detach().float().clone()
                b = mod.bias.detach().float().clone() if mod.bias is not None else torch.zeros(w.shape[0])
            for pname, p in (("weight", w), ("bias", b)):
                if not torch.isfinite(p).all():
                    raise UserError(f"{node.target}.{pname}: weights contain NaN or Inf; refusing to quantize")
            wk, bk = f"{node.target}.weight", f"{node.target}.bias"
            if wk in params:  # a module called again gets its own tensors: its bias scale is s_in · s_w of this call
                wk, bk = f"{node.name}.weight", f"{node.name}.bias"
            params[wk], params[bk] = w, b
            ins = ins[:1] + [wk, bk]
        if kind in ("add", "sub", "mul") and len(ins) != 2:
            raise fail(node, f"{target} with a constant operand")
        ops.append(Op(kind, ins, [node.name], attrs, source=str(src)))
        name_of[node] = node.name
        shapes[node.name] = _nhwc(shape)
    if input_name is None or output_name is None:
        raise UserError("model has no input or no output")
    ops = _fuse_activations(ops, params)
    _flatten_to_nhwc(ops, params, shapes, output_name)
    used = {n for op in ops for n in op.outputs} | {input_name}
    return FloatGraph(ops, params, {n: s for n, s in shapes.items() if n in used}, input_name, output_name)


_SCALAR_OPS = {operator.mul: "mul", torch.mul: "mul", "mul": "mul", operator.add: "add", torch.add: "add", "add": "add",
               operator.sub: "sub", torch.sub: "sub", "sub": "sub", operator.truediv: "div", torch.div: "div",
               "div": "div"}


def _scalar_affine(node: fx.Node, values: dict[fx.Node, object]) -> tuple[fx.Node, tuple[float, float]] | None:
    """(x, (s, t)) when `node` computes s · x + t from one tensor x and one Python number (x * 0.2, 0.5 * x, x / 6,
    x + 1, x - 1, 1 - x, also as torch functions or methods); else None."""
    op = _SCALAR_OPS.get(node.target) if node.op in ("call_function", "call_method") else None
    if op is None or len(node.args) != 2 or set(node.kwargs) - {"alpha"} or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args
    tensors = [v for v in (a, b) if isinstance(v, fx.Node) and "tensor_meta" in v.meta]
    if len(tensors) != 1:
        return None
    x = tensors[0]
    c = b if x is a else a
    c = values.get(c) if isinstance(c, fx.Node) else c
    if not isinstance(c, int | float) or isinstance(c, bool) or not np.isfinite(c):
        return None
    c = float(c)
    if op == "mul":
        return x, (c, 0.0)
    if op == "add":
        return x, (1.0, c)
    if op == "sub":
        return x, ((1.0, -c) if x is a else (-1.0, c))
    return (x, (1.0 / c, 0.0)) if x is a and c != 0 else None  # c / x is no affine map


def _is_flatten(index: object, n: int) -> bool:
    """A movement chain whose element indices are a [1, n] row in the source map's NCHW order: torch's flatten."""
    return isinstance(index, torch.Tensor) and tuple(index.shape) == (1, n) and \
        torch.equal(index[0], torch.arange(n, device=index.device))


def _lower(node: fx.Node, mod: nn.Module | None, target: object, fail, values: Callable[[fx.Node], object]
           ) -> tuple[str, dict]:
    """(op kind or 'alias' / 'relu' / 'relu6' / 'hardsigmoid', attrs) for one fx node; `values` holds the
    sizes computed in forward()."""
    args, kwargs = node.args, node.kwargs
    if mod is not None:
        if isinstance(mod, nn.Conv2d):
            attrs = {"stride": _pair(mod.stride), "padding": _conv_padding(mod), "dilation": _pair(mod.dilation),
                     "fused": "none"}
            if mod.groups == 1:
                return "conv2d", attrs
            if mod.groups == mod.in_channels and mod.out_channels % mod.in_channels == 0:
                return "depthwise_conv2d", {**attrs, "depth_multiplier": mod.out_channels // mod.in_channels}
            return "conv2d", attrs  # grouped: the weight [O, C_in / groups, kh, kw] says so (TFLite's rule)
        if isinstance(mod, nn.Linear):
            return "fully_connected", {"fused": "none"}
        if isinstance(mod, nn.ReLU):
            return "relu", {}
        if isinstance(mod, nn.ReLU6) or (isinstance(mod, nn.Hardtanh) and (mod.min_val, mod.max_val) == (0.0, 6.0)):
            return "relu6", {}
        if isinstance(mod, nn.Hardtanh):
            return _hardtanh(node, mod.min_val, mod.max_val, fail)
        if type(mod) in _TABLE_MODULES:
            return _TABLE_MODULES[type(mod)], {}
        if isinstance(mod, nn.LeakyReLU):
            return "leaky_relu", {"alpha": float(mod.negative_slope)}
        if isinstance(mod, nn.ELU):
            return "elu", {"alpha": float(mod.alpha)}
        if isinstance(mod, nn.CELU):
            return "celu", {"alpha": float(mod.alpha)}
        if isinstance(mod, nn.PReLU):
            return _prelu(mod.weight)
        if isinstance(mod, nn.Softmax):
            return _softmax(node, mod.dim, {}, fail)
        if isinstance(mod, nn.Softplus):
            return "softplus", {"beta": float(mod.beta), "threshold": float(mod.threshold)}
        if isinstance(mod, nn.GELU):
            return _gelu(node, mod.approximate, fail)
        if isinstance(mod, nn.Hardsigmoid):
            return "hardsigmoid", {}
        if isinstance(mod, (nn.Identity, *DROPOUT_MODULES)):
            return "alias", {}
        if isinstance(mod, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
            return _adaptive_pool(node, isinstance(mod, nn.AdaptiveAvgPool2d), mod.output_size, fail)
        if isinstance(mod, nn.Upsample):  # UpsamplingNearest2d included
            return _resize_nearest(node, mod.mode, mod, fail)
        if isinstance(mod, nn.MaxPool2d | nn.AvgPool2d):
            return _pool(node, *pool_arguments(node, mod), fail)
        if isinstance(mod, nn.ZeroPad2d | nn.ConstantPad2d):
            return _zero_pad(node, mod.padding, "constant", mod.value, fail)
        if isinstance(mod, nn.Flatten):
            return _reshape(node, fail)
        if isinstance(mod, nn.BatchNorm2d):
            # Not after a conv (pre-activation: BN → ReLU → conv, as in PreActResNet, DenseNet): its inference
            # affine x · γ/σ + (β − μ·γ/σ) is a 1×1 depthwise conv, whose one weight per
            # channel quantizes exactly at any bit width (code ±qmax, the scale carries the value).
            if mod.running_mean is None or mod.running_var is None:
                raise fail(node, "BatchNorm2d without running statistics (track_running_stats=False)")
            return "depthwise_conv2d", {"stride": [1, 1], "padding": [0, 0, 0, 0], "dilation": [1, 1],
                                        "fused": "none", "depth_multiplier": 1}
        raise fail(node, f"module {type(mod).__name__}")
    if node.op == "call_function":
        if target in (operator.add, torch.add):
            return "add", {"fused": "none"}
        if target in (operator.sub, torch.sub):
            return "sub", {"fused": "none"}
        if target in (operator.mul, torch.mul):
            return "mul", {"fused": "none"}
        if target in (F.relu, torch.relu, F.relu_, torch.relu_):
            return "relu", {}
        if target is F.relu6:
            return "relu6", {}
        if target is F.hardtanh:
            return _hardtanh(node, *_bounds(args, kwargs, ("min_val", "max_val"), (-1.0, 1.0)), fail)
        if target in (torch.clamp, torch.clip):
            return _hardtanh(node, *_bounds(args, kwargs), fail)
        if target in _TABLE_FUNCTIONS:
            return _TABLE_FUNCTIONS[target], {}
        if target is F.gelu:
            return _gelu(node, args[1] if len(args) > 1 else kwargs.get("approximate", "none"), fail)
        if target is F.leaky_relu:
            return "leaky_relu", {"alpha": float(args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01))}
        if target is F.elu:
            return "elu", {"alpha": float(args[1] if len(args) > 1 else kwargs.get("alpha", 1.0))}
        if target in (F.celu, torch.celu):
            return "celu", {"alpha": float(args[1] if len(args) > 1 else kwargs.get("alpha", 1.0))}
        if (weight := _prelu_weight(node)) is not None:
            return _prelu(node.graph.owning_module.get_parameter(weight.target))
        if target in (F.softmax, torch.softmax):
            return _softmax(node, args[1] if len(args) > 1 else kwargs.get("dim"), kwargs, fail)
        if target is F.softplus:
            beta = args[1] if len(args) > 1 else kwargs.get("beta", 1.0)
            threshold = args[2] if len(args) > 2 else kwargs.get("threshold", 20.0)
            return "softplus", {"beta": float(beta), "threshold": float(threshold)}
        if target is F.hardsigmoid:
            return "hardsigmoid", {}
        if target in DROPOUT_FUNCTIONS:
            return "alias", {}
        if target is stochastic_depth:  # torchvision's residual drop (EfficientNet): identity unless training
            training = args[3] if len(args) > 3 else kwargs.get("training", True)
            if training is False:
                return "alias", {}
        if target in POOL_FUNCTIONS:  # F.max_pool2d(x, 2), F.avg_pool2d(x, 4), torch.max_pool2d, ...
            return _pool(node, *pool_arguments(node, values=values), fail)
        if target is F.pad:  # F.pad(x, (left, right, top, bottom)): TF-style asymmetric "same" padding
            a = dict(zip(("input", "pad", "mode", "value"), args, strict=False)) | kwargs
            return _zero_pad(node, a["pad"], a.get("mode", "constant"), a.get("value"), fail)
        if target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
            size = args[1] if len(args) > 1 else kwargs.get("output_size")
            return _adaptive_pool(node, target is F.adaptive_avg_pool2d, size, fail)
        if target is F.interpolate:
            rest, kw = fx.node.map_arg((tuple(args[1:]), dict(kwargs)), values)  # sizes computed in forward()
            mode = rest[2] if len(rest) > 2 else kw.get("mode", "nearest")
            return _resize_nearest(node, mode, lambda p: F.interpolate(p, *rest, **kw), fail)
        if target is torch.mean:
            return _mean(node, list(args[1:]), kwargs, fail)
        if target in (torch.flatten, torch.reshape):
            return _reshape(node, fail)
        if target in (torch.cat, torch.concat):
            return _concat(node, fail)
    if node.op == "call_method":
        if node.target == "mean":
            return _mean(node, list(args[1:]), kwargs, fail)
        if node.target in ("flatten", "view", "reshape"):
            return _reshape(node, fail)
        if node.target in ("relu", "relu_"):
            return "relu", {}
        if node.target in ("sigmoid", "sigmoid_", "tanh", "tanh_"):
            return node.target.rstrip("_"), {}
        if node.target == "softmax":
            return _softmax(node, args[1] if len(args) > 1 else kwargs.get("dim"), kwargs, fail)
        if node.target in ("clamp", "clamp_", "clip", "clip_"):
            return _hardtanh(node, *_bounds(args, kwargs), fail)
        if node.target == "add":
            return "add", {"fused": "none"}
        if node.target == "sub":
            return "sub", {"fused": "none"}
        if node.target == "mul":
            return "mul", {"fused": "none"}
    raise fail(node, f"{node.op} {getattr(target, '__name__', target)}")


# Elementwise functions lowered to table ops (qmodel.TABLE_OPS); leaky_relu and elu also carry their alpha,
# softplus its beta and threshold.
_TABLE_MODULES = {nn.Hardswish: "hardswish", nn.Sigmoid: "sigmoid", nn.SiLU: "silu", nn.Tanh: "tanh",
                  nn.Mish: "mish", nn.SELU: "selu", nn.Softsign: "softsign"}
_TABLE_FUNCTIONS = {F.hardswish: "hardswish", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.silu: "silu",
                    torch.tanh: "tanh", F.tanh: "tanh", F.mish: "mish", F.selu: "selu", torch.selu: "selu",
                    F.softsign: "softsign"}


def _pool(node: fx.Node, kind: str, a: dict, fail) -> tuple[str, dict]:
    """max_pool2d / avg_pool2d attrs from torch's pool arguments `a`.

    The QM's pools run floor-mode windows over the input padded by [top, bottom, left, right], and padded
    positions take no part: not in a max, not in an average's divisor (TFLite's and XNNPACK's rule). torch's
    variants map onto that exactly:
    - ceil_mode: the output size is torch's (read off the trace); the windows that hang over the bottom/right
      edge get that overhang as extra bottom/right padding, which torch also leaves out of the max and the mean.
    - count_include_pad=True (avg_pool2d's default) with padding: torch averages the padding's zeros in, so the
      padding becomes a real `pad` op (real 0 = the zero point) before the pool (attr "pre_pad", split off by
      float_graph), and only a ceil-mode overhang stays pool padding: torch's divisor also stops at the end of
      the padding (`min(start + k, size + pad)`)."""
    what = "MaxPool2d" if kind == "max_pool2d" else "AvgPool2d"
    if _pair(a.get("dilation", 1)) != [1, 1]:
        raise fail(node, f"{what} with dilation {a['dilation']}")
    if a.get("return_indices"):
        raise fail(node, f"{what} with return_indices")
    if a.get("divisor_override"):
        raise fail(node, f"{what} with divisor_override")
    k, p = _pair(a["kernel_size"]), _pair(a["padding"])
    s = _pair(a["stride"] or a["kernel_size"])  # torch.max_pool2d's default stride is [] (= the kernel)
    in_hw = list(node.args[0].meta["tensor_meta"].shape[2:])
    out_hw = list(node.meta["tensor_meta"].shape[2:])
    if kind == "avg_pool2d" and k == in_hw and not any(p) and out_hw == [1, 1]:
        return "mean", {"axes": [1, 2], "keepdims": True}  # F.avg_pool2d(x, 4) of a 4×4 map: a global average
    after = list(p)
    if a["ceil_mode"]:
        after = [max(pp, (o - 1) * st + kk - n - pp) for o, st, kk, n, pp in zip(out_hw, s, k, in_hw, p, strict=True)]
    attrs = {"kernel": k, "stride": s, "padding": [p[0], after[0], p[1], after[1]]}
    if kind == "avg_pool2d" and a["count_include_pad"] and any(p):
        attrs["padding"] = [0, after[0] - p[0], 0, after[1] - p[1]]
        attrs["pre_pad"] = [p[0], p[0], p[1], p[1]]
    return kind, attrs


def _zero_pad(node: fx.Node, pad: object, mode: str, value: float | None, fail) -> tuple[str, dict]:
    """A constant-zero pad of H and W (torch order (left, right[, top, bottom])) → `pad`, [top, bottom, left,
    right]. Only zeros: the int8 pad writes the zero point, which is real 0 and nothing else."""
    if mode != "constant":
        raise fail(node, f"pad mode {mode!r}; allowed: 'constant' with value 0")
    if value not in (None, 0, 0.0):
        raise fail(node, f"pad value {value!r}; allowed: 0 (the zero point)")
    pad = [pad] * 4 if isinstance(pad, int) else list(pad)
    if len(pad) not in (2, 4) or not all(isinstance(p, int) and p >= 0 for p in pad):
        raise fail(node, f"pad {tuple(pad)}; allowed: (left, right) or (left, right, top, bottom), each an int >= 0 "
                         f"(H and W only, no cropping)")
    left, right, top, bottom = [*pad, 0, 0][:4]
    return "pad", {"padding": [top, bottom, left, right]}


def _adaptive_pool(node: fx.Node, average: bool, output_size: object, fail) -> tuple[str, dict]:
    """An adaptive pool whose bins are all one size: the map itself (VGG's and AlexNet's AdaptiveAvgPool2d(7 or 6)
    at 224 px), a global average (`mean`), or a pool with kernel = stride = input / output."""
    _, _, h, w = node.args[0].meta["tensor_meta"].shape
    size = [output_size] * 2 if isinstance(output_size, int) or output_size is None else list(output_size)
    out = [int(o) if o is not None else i for o, i in zip(size, (h, w), strict=True)]
    if average and out == [1, 1]:  # a mean even of a 1×1 map: ghnq.fakequant quantizes every global pool
        return "mean", {"axes": [1, 2], "keepdims": True}
    if out == [h, w]:
        return "alias", {}
    if out[0] >= h and out[1] >= w:  # every bin is one pixel: a nearest upsampling (VGG's 7×7 pool of a 1×1 map)
        pool = F.adaptive_avg_pool2d if average else F.adaptive_max_pool2d
        return _resize_nearest(node, "nearest", lambda p: pool(p, out), fail)
    if h % out[0] or w % out[1]:
        raise fail(node, f"adaptive pool of a {h}×{w} map to {out[0]}×{out[1]} (bins of unequal size; allowed: an "
                         "output that divides the input)")
    k = [h // out[0], w // out[1]]
    return "avg_pool2d" if average else "max_pool2d", {"kernel": k, "stride": k, "padding": [0, 0, 0, 0]}


def _resize_nearest(node: fx.Node, mode: str, run: Callable[[torch.Tensor], torch.Tensor], fail) -> tuple[str, dict]:
    """Nearest upsampling by whole factors (nn.Upsample, F.interpolate, an adaptive pool to a multiple of its input):
    every pixel repeated fh × fw times, a copy of codes. `run` is the node's own function; applied to a map of pixel
    numbers, it shows which pixel each output position takes, which must be pixel i // f."""
    _, _, h, w = node.args[0].meta["tensor_meta"].shape
    _, _, oh, ow = node.meta["tensor_meta"].shape
    if mode not in ("nearest", "nearest-exact"):
        raise fail(node, f"resize mode {mode!r} (only 'nearest' by whole factors)")
    if oh % h or ow % w:
        raise fail(node, f"nearest resize of a {h}×{w} map to {oh}×{ow} (only whole factors)")
    factor = [oh // h, ow // w]
    probe = torch.arange(h * w, dtype=torch.float64).view(1, 1, h, w)
    want = probe.repeat_interleave(factor[0], 2).repeat_interleave(factor[1], 3)
    if not torch.equal(run(probe), want):
        raise fail(node, f"nearest resize {h}×{w} → {oh}×{ow} whose output pixel i is not input pixel i // {factor}")
    for n, o in ((h, oh), (w, ow)):
        if not np.array_equal(nearest_source_index(n, o), np.arange(o) // (o // n)):
            raise fail(node, f"nearest resize by {o // n} of a size-{n} axis (TFLite's and ExecuTorch's float32 index "
                             "arithmetic picks other pixels than torch)")
    return "resize_nearest", {"factor": factor}


def _gelu(node: fx.Node, approximate: str, fail) -> tuple[str, dict]:
    # XNNPACK's delegate has the exact (erf) GELU only, and ExecuTorch 1.5.1's GeluVisitor drops `approximate`:
    # a tanh GELU would silently run as the erf one.
    if approximate != "none":
        raise fail(node, f"GELU(approximate={approximate!r}) (only the exact form, approximate='none')")
    return "gelu", {}


def _concat(node: fx.Node, fail) -> tuple[str, dict]:
    parts = node.args[0] if node.args else node.kwargs.get("tensors", ())
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not parts or not all(isinstance(p, fx.Node) and "tensor_meta" in p.meta for p in parts):
        raise fail(node, "cat of something other than tensors")
    rank = len(parts[0].meta["tensor_meta"].shape)
    if rank not in (2, 4) or dim % rank != 1:
        raise fail(node, f"cat along dim {dim} of {rank}-D tensors (only along channels, dim 1)")
    return "concat", {"axis": 3 if rank == 4 else 1}


def _softmax(node: fx.Node, dim: object, kwargs: dict, fail) -> tuple[str, dict]:
    """softmax over the features of a [N, C] tensor (dim 1 or -1): the integer softmax op."""
    meta = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
    rank = len(meta.shape) if meta is not None else None
    if rank != 2 or dim not in (1, -1, None) or kwargs.get("dtype") is not None:
        raise fail(node, f"softmax over dim {dim} of a {rank}-D tensor (supported: over the features of a [N, C] "
                         "tensor, dim=1 or -1, as a classifier's last op writes it; no dtype=)")
    return "softmax", {}


def _prelu_weight(node: fx.Node) -> fx.Node | None:
    """The get_attr node of F.prelu(x, weight)'s weight when it is a model parameter, else None."""
    if node.op != "call_function" or node.target not in (F.prelu, torch.prelu):
        return None
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    return w if isinstance(w, fx.Node) and w.op == "get_attr" else None


def _prelu(weight: torch.Tensor) -> tuple[str, dict]:
    """One slope: leaky_relu's function; one per channel: a prelu op, a table per channel."""
    alpha = [float(v) for v in weight.detach().float().reshape(-1)]
    return ("leaky_relu", {"alpha": alpha[0]}) if len(alpha) == 1 else ("prelu", {"alpha": alpha})


def _bounds(args: tuple, kwargs: dict, names: tuple[str, str] = ("min", "max"),
            defaults: tuple[object, object] = (None, None)) -> tuple[object, object]:
    """(lo, hi) of a clamp as written (numbers, None or anything else): torch.clamp / x.clamp / clip's min and
    max, or F.hardtanh's min_val and max_val (default ±1)."""
    return tuple(args[i + 1] if len(args) > i + 1 else kwargs.get(names[i], defaults[i]) for i in range(2))


def _hardtanh(node: fx.Node, lo: object, hi: object, fail) -> tuple[str, dict]:
    """A clamp to [lo, hi] in any spelling: relu / relu6 for (0, open) / (0, 6) (a clamp fused into the layer
    before it, sharing its scale), else a hardtanh table op (its own output scale)."""
    def number(v: object) -> float | None:
        if v is None:
            return None
        if not isinstance(v, int | float) or isinstance(v, bool) or not np.isfinite(v):
            raise fail(node, f"a clamp bound {v!r} (allowed: a finite number, or none for an open side)")
        return float(v)

    lo, hi = number(lo), number(hi)
    if (lo, hi) == (0.0, 6.0):
        return "relu6", {}
    if (lo, hi) == (0.0, None):
        return "relu", {}
    if lo is None and hi is None or (lo is not None and hi is not None and lo >= hi):
        raise fail(node, f"a clamp to [{lo}, {hi}] (allowed: min < max, at least one of them given)")
    return "hardtanh", {"min": lo, "max": hi}


def _mean_dims(node: fx.Node) -> tuple[list[int], bool] | None:
    """(the dims a mean node averages, as non-negative indices, keepdim), or None for any other node."""
    if not ((node.op == "call_method" and node.target == "mean") or (node.op == "call_function"
                                                                      and node.target is torch.mean)):
        return None
    rest, kwargs = list(node.args[1:]), node.kwargs
    dims = rest[0] if rest else kwargs.get("dim")
    keep = rest[1] if len(rest) > 1 else kwargs.get("keepdim", False)
    meta = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
    if meta is None or not isinstance(dims, int | list | tuple):
        return None
    rank = len(meta.shape)
    return sorted(d % rank for d in ([dims] if isinstance(dims, int) else dims)), bool(keep)


def _mean(node: fx.Node, rest: list, kwargs: dict, fail) -> tuple[str, dict]:
    dims = rest[0] if rest else kwargs.get("dim")
    keep = rest[1] if len(rest) > 1 else kwargs.get("keepdim", False)
    rank = len(node.args[0].meta["tensor_meta"].shape)
    if rank != 4 or not isinstance(dims, list | tuple) or sorted(d % 4 for d in dims) != [2, 3]:
        raise fail(node, f"mean over dims {dims}; only the global average over H, W of a 4-D tensor")
    return "mean", {"axes": [1, 2], "keepdims": bool(keep)}


def _reshape(node: fx.Node, fail) -> tuple[str, dict]:
    src = node.args[0].meta["tensor_meta"].shape
    dst = node.meta["tensor_meta"].shape
    if len(src) == 2 and list(dst) == [src[0], src[1], 1, 1]:  # a Linear squeeze-excite's gate back to a map
        return "reshape", {"shape": [1, 1, 1, int(src[1])]}
    if len(dst) != 2 or int(np.prod(src[1:])) != int(dst[1]) or len(src) not in (2, 4):
        raise fail(node, f"reshape {list(src)} → {list(dst)} (only a flatten to [N, features], and [N, C] → "
                         f"[N, C, 1, 1], are)")
    if len(src) == 2 and list(src) == list(dst):
        return "alias", {}
    # The QM flattens in NHWC order; for H·W > 1 that differs from torch's NCHW order, and
    # `_flatten_to_nhwc` reorders the weight columns of the Linear that reads it to match.
    return "reshape", {"shape": [1, int(dst[1])]}


def _flatten_to_nhwc(ops: list[Op], params: dict[str, torch.Tensor], shapes: dict[str, list[int]],
                     output: str) -> None:
    """A flatten of a [C, H, W] map with H·W > 1 is an NHWC flatten in the QM (what TFLite's RESHAPE does on
    NHWC data): permute the columns of each Linear that reads it from (C, H, W) to (H, W, C) order, so the
    graph computes what the torch model does. Any other reader would see the other order: refused."""
    for op in ops:
        if op.kind != "reshape":
            continue
        shape = shapes[op.inputs[0]]
        if len(shape) != 4 or shape[1] * shape[2] == 1:
            continue
        _, h, w, c = shape
        if op.outputs[0] == output:
            raise UserError(f"model node {op.source!r}: the model's output is a flatten of a [{c}, {h}, {w}] map; "
                            "supported: a flatten of a spatial map read only by Linear layers")
        for user in (u for u in ops if op.outputs[0] in u.inputs):
            if user.kind != "fully_connected" or user.inputs[0] != op.outputs[0]:
                raise UserError(f"model node {op.source!r}: the flatten of a [{c}, {h}, {w}] map feeds "
                                f"{user.kind} ({user.source!r}); supported: a flatten of a spatial map read only "
                                "by Linear layers (their weight columns are reordered to NHWC)")
            wk = user.inputs[1]
            out_features = params[wk].shape[0]
            params[wk] = params[wk].reshape(out_features, c, h, w).permute(0, 2, 3, 1).reshape(out_features, -1)


def _clamp_targets(t: str, producer: dict[str, Op], consumers: dict[str, int]) -> list[Op] | None:
    """The layers a relu / relu6 of tensor `t` can fuse into: its producer, or through ops that commute with the
    clamp (CLAMP_COMMUTES, and a concat: each of its inputs) the layers before them. None where some path does not
    end in a layer with no fused activation, or a tensor on the way has another reader."""
    q = producer.get(t)
    if q is None or consumers.get(t) != 1:
        return None
    if q.kind in FUSABLE and q.attrs.get("fused") == "none":
        return [q]
    if q.kind in CLAMP_COMMUTES:
        return _clamp_targets(q.inputs[0], producer, consumers)
    if q.kind == "concat":
        parts = [_clamp_targets(i, producer, consumers) for i in q.inputs]
        return None if any(p is None for p in parts) else [op for p in parts for op in p]
    return None


def _fuse_activations(ops: list[Op], params: dict[str, torch.Tensor]) -> list[Op]:
    """Fuse relu / relu6 / hardsigmoid pseudo-ops into the op that produces their input; a relu / relu6 that no
    layer can take stays a standalone op."""
    out: list[Op] = []
    producer: dict[str, Op] = {}
    consumers: dict[str, int] = {}
    for op in ops:
        for n in op.inputs:
            consumers[n] = consumers.get(n, 0) + 1
    for op in ops:
        if op.kind not in ("relu", "relu6", "hardsigmoid"):
            out.append(op)
            for n in op.outputs:
                producer[n] = op
            continue
        src = op.inputs[0]
        p = producer.get(src)
        # relu / relu6 after ops that commute with a clamp (LeNet's F.relu(F.max_pool2d(conv(x), 2)), DPN's
        # F.relu(torch.cat(...))): fused into the layers before them, which then hand on clamped values; the op
        # that made the relu's input writes the relu's output.
        targets = _clamp_targets(src, producer, consumers) if op.kind != "hardsigmoid" else None
        if targets:
            for t in targets:
                t.attrs["fused"] = op.kind
            producer[src].outputs = list(op.outputs)
            producer[op.outputs[0]] = producer[src]
            continue
        if op.kind in CLAMP_OPS:
            # nothing before it can take the clamp (its input has other readers, or comes from a mean, mul, table
            # op, ...): a standalone relu / relu6 op, a clamp of the codes at its input's (scale, zp)
            out.append(op)
            producer[op.outputs[0]] = op
            continue
        if p is None or p.kind not in WEIGHTED_OPS or p.attrs.get("fused") != "none" or consumers.get(src, 0) != 1:
            raise UserError(f"model node {op.source!r}: hardsigmoid after {p.kind if p else 'the input'} "
                            f"{'(whose output has other users)' if consumers.get(src, 0) > 1 else ''}cannot be "
                            f"folded; hardsigmoid is supported only directly after one of {', '.join(WEIGHTED_OPS)} "
                            f"with no other user of that output")
        # a hardsigmoid: relu6(z + 3) / 6 = clamp((z + 3) / 6, 0, 1), the producer's float weights and bias scaled
        wk, bk = p.inputs[1], p.inputs[2]
        params[wk] = (params[wk].double() / 6).float()
        params[bk] = ((params[bk].double() + 3) / 6).float()
        p.attrs["fused"] = "relu_0_to_1"
        p.outputs = list(op.outputs)
        producer[op.outputs[0]] = p
    return out


# ----------------------------------------------------------------------------------------------------
# 2. input normalization


def fold_input_normalization(g: FloatGraph) -> None:
    """Graph input becomes (pixel - 128)/255 (the int8 input's real value); (x01 - MEAN) / STD, with
    x01 = input + 128/255, moves into every conv reading the input."""
    if g.shapes[g.input][-1] != len(MEAN):
        raise UserError(f"model input has {g.shapes[g.input][-1]} channels; the uint8 image input needs "
                        f"{len(MEAN)} (RGB)")
    # Convs read the image directly or through zero pads (TF-style "same" padding as a ZeroPad2d): a pad's zero
    # becomes pixel 128 here, as a conv's own padding does (see qmodel's "Input and output").
    pads = [op for op in g.ops if op.kind == "pad" and op.inputs[0] == g.input]
    readers = {g.input, *(op.outputs[0] for op in pads)}
    users = [op for op in g.ops if readers & set(op.inputs) and op not in pads]
    for op in users:
        if (op.kind != "conv2d" or op.inputs[0] not in readers or len(readers & set(op.inputs)) > 1
                or g.params[op.inputs[1]].shape[1] != len(MEAN)):
            raise UserError(f"model node {op.source!r}: the input normalization can be folded only into "
                            f"Conv2d layers (groups 1) reading the image, directly or through a zero pad; "
                            f"found {op.kind}")
    for op in users:
        wk, bk = op.inputs[1], op.inputs[2]
        mean = torch.tensor(MEAN, dtype=torch.float64).view(1, -1, 1, 1) - 128.0 / 255.0
        std = torch.tensor(STD, dtype=torch.float64).view(1, -1, 1, 1)
        w = g.params[wk].double() / std
        g.params[bk] = (g.params[bk].double() - (w * mean).sum(dim=(1, 2, 3))).float()
        g.params[wk] = w.float()


# ----------------------------------------------------------------------------------------------------
# 3. observe


def observed_tensors(g: FloatGraph) -> list[str]:
    """Activation tensors whose qparams come from an observer (the rest are fixed or shared)."""
    return [op.outputs[0] for op in g.ops
            if op.kind not in (*SHARES_INPUT_QPARAMS, "softmax") and op.attrs.get("fused") != "relu_0_to_1"]


@torch.no_grad()
def observe(g: FloatGraph, images: np.ndarray, method: str, act_bits: int, batch_size: int = 128,
            progress: bool = True, device: str = "cpu") -> dict[str, tuple[float, int, float, float]]:
    """Run the float graph on uint8 NHWC images; return tensor → (scale, zp, rmin, rmax)."""
    if len(images) == 0:
        raise UserError("the calibration set is empty; give at least one image (--images)")
    names = observed_tensors(g)
    obs = {n: observers.make_observer(method, act_bits) for n in names}
    params = {k: v.to(device) for k, v in g.params.items()}

    def hook(name: str, y: torch.Tensor) -> torch.Tensor:
        if name in obs:
            if not torch.isfinite(y).all():
                raise UserError(f"tensor {name!r}: NaN or Inf activations on calibration images")
            obs[name](y.detach().cpu())
        return y

    for i in tqdm(range(0, len(images), batch_size), desc=f"calibrating ({method})", unit="batch",
                  disable=not progress):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).to(device)
        run_ops(g.ops, g.input, (x.permute(0, 3, 1, 2).float() - 128.0) / 255.0, params, hook)
    return {n: observers.qparams(o, act_bits) for n, o in obs.items()}


# ----------------------------------------------------------------------------------------------------
# 4. quantize


def quantize_weight(w: torch.Tensor, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes, float32 per-output-channel scales), symmetric, codes in ±(2^(bits-1)-1)."""
    qmax = (1 << (bits - 1)) - 1
    scale = observers.weight_qparams(w, bits)
    q = torch.round(w.double() / scale.double().view(-1, *([1] * (w.dim() - 1)))).clamp(-qmax, qmax)
    return q.to(torch.int8).numpy(), scale.numpy().astype(np.float32)


def quantize_bias(b: torch.Tensor, s_in: float, s_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 codes with scale float32(s_in) * float32(s_w[c]) (a float32 product, as the TFLite converter)."""
    s_b = (np.float32(s_in) * s_w.astype(np.float32)).astype(np.float32)
    q = np.round(b.double().numpy() / s_b.astype(np.float64))
    return np.clip(q, -(2 ** 31), 2 ** 31 - 1).astype(np.int32), s_b


def concat_qparams(g: FloatGraph, act_qparams: dict[str, tuple[float, int, float, float]], act_bits: int
                   ) -> dict[str, tuple[float, int, float, float]]:
    """One (scale, zp) for every tensor a concat joins, as TFLite's int8 CONCATENATION and XNNPACK require.

    Groups: a concat's inputs and output, closed over the ops that share their input's parameters (a max pool
    feeding a concat pulls in its own input). Each group gets the union of its members' observed ranges, so no
    member is clipped more than its own observer clipped it.
    """
    links: dict[str, set[str]] = {}
    for op in g.ops:
        if op.kind == "concat" or op.kind in SHARES_INPUT_QPARAMS:
            for n in op.inputs:
                links.setdefault(n, set()).add(op.outputs[0])
                links.setdefault(op.outputs[0], set()).add(n)
    groups, seen = [], set()
    for op in g.ops:
        if op.kind != "concat" or op.outputs[0] in seen:
            continue
        group, todo = set(), [op.outputs[0]]
        while todo:  # connected through concat and sharing links
            n = todo.pop()
            if n not in group:
                group.add(n)
                todo += links.get(n, ())
        seen |= group
        groups.append(sorted(group))
    qmin, qmax = observers.act_range(act_bits)
    shared = {op.outputs[0] for op in g.ops if op.kind in SHARES_INPUT_QPARAMS}
    out: dict[str, tuple[float, int, float, float]] = {}
    for group in groups:
        fixed = [n for n in group if n == g.input or n not in act_qparams and n not in shared]
        if fixed:
            raise UserError(f"tensor {fixed[0]!r} has fixed quantization (the image input or a hardsigmoid gate) "
                            "and is joined by a concat, whose inputs must share one (scale, zero point); "
                            "supported: concat of conv / linear / add / pool outputs")
        ranges = [act_qparams[n][2:] for n in group if n in act_qparams]
        lo, hi = min(0.0, *(r[0] for r in ranges)), max(0.0, *(r[1] for r in ranges))
        scale = float(np.float32(max((hi - lo) / (qmax - qmin), np.finfo(np.float32).eps)))
        zp = int(np.clip(round(qmin - lo / scale), qmin, qmax))
        for n in group:
            out[n] = (scale, zp, (qmin - zp) * scale, (qmax - zp) * scale)
    return out


def quantize(g: FloatGraph, act_qparams: dict[str, tuple[float, int, float, float]], weight_bits: int,
             act_bits: int, meta: dict) -> QuantizedModel:
    if weight_bits not in WEIGHT_BITS:
        raise UserError(f"weight bits {weight_bits}; allowed: {', '.join(map(str, WEIGHT_BITS))}")
    if act_bits not in (8, 4):
        raise UserError(f"activation bits {act_bits}; allowed: 8, 4 (4 in the simulation only)")
    tensors: dict[str, Tensor] = {}

    def act(name: str, scale: float, zp: int, bits: int, rmin: float | None, rmax: float | None) -> None:
        tensors[name] = Tensor(name, g.shapes[name], "int8", np.array([scale], np.float32),
                               np.array([zp], np.int64), None, bits, None, rmin, rmax)

    act(g.input, INPUT_SCALE, INPUT_ZERO_POINT, 8, -128 * INPUT_SCALE, 127 * INPUT_SCALE)
    unit_scale = float(np.float32(1.0 / ((1 << act_bits) - 1)))
    act_qparams = {**act_qparams, **concat_qparams(g, act_qparams, act_bits)}
    for op in g.ops:
        out = op.outputs[0]
        if op.kind in SHARES_INPUT_QPARAMS:
            t = tensors[op.inputs[0]]
            act(out, float(t.scale[0]), int(t.zero_point[0]), t.bits, t.rmin, t.rmax)
        elif op.attrs.get("fused") == "relu_0_to_1":
            act(out, unit_scale, -(1 << (act_bits - 1)), act_bits, 0.0, 1.0)
        elif op.kind == "softmax":  # probabilities: scale 1/2^bits, the lowest code is 0
            scale, zp = softmax_qparams(act_bits)
            act(out, scale, zp, act_bits, 0.0, 1.0 - scale)
        else:
            act(out, *act_qparams[out][:2], act_bits, *act_qparams[out][2:])
        if op.kind in WEIGHTED_OPS:
            wk, bk = op.inputs[1], op.inputs[2]
            qw, sw = quantize_weight(g.params[wk], weight_bits)
            s_in = float(tensors[op.inputs[0]].scale[0])
            qb, sb = quantize_bias(g.params[bk], s_in, sw)
            n = len(sw)
            tensors[wk] = Tensor(wk, list(qw.shape), "int8", sw, np.zeros(n, np.int64), 0, weight_bits, qw)
            tensors[bk] = Tensor(bk, list(qb.shape), "int32", sb, np.zeros(n, np.int64), 0, 32, qb)
    qm = QuantizedModel(ops=copy.deepcopy(g.ops), tensors=tensors, input=g.input, output=g.output, meta=meta)
    for op in qm.ops:  # the integer softmax's exp table depends on its input's scale
        if op.kind == "softmax":
            t = tensors[op.inputs[0]]
            op.attrs["exp_table"] = softmax_exp_table(float(t.scale[0]), t.shape[-1])
    qm.validate()
    return qm
