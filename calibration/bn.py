"""BatchNorm: re-estimate running statistics on calibration images, and fold BN into the preceding conv.

Predicted (GHN-Q) or perturbed weights come without meaningful BN statistics, so `recalibrate_bn` resets
them and recomputes them as a cumulative average (momentum=None) over the calibration batches, with every
other layer in eval mode. `fold_conv_bn` rewrites a traced graph so every conv → BN pair becomes one conv
with bias (float64 arithmetic, then float32): w' = w·γ/√(σ²+ε), b' = (b − μ)·γ/√(σ²+ε) + β; Linear → BatchNorm1d
likewise.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import fx, nn
from tqdm import tqdm

from ghnq.cli import UserError
from ghnq.data import to_float

BN_BATCH = 128  # images per BN re-estimation batch; ghnq.evaluate's train-loop engine uses the same batches


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: np.ndarray, batch_size: int = BN_BATCH, progress: bool = True) -> int:
    """Recompute every BatchNorm's running mean/var on uint8 NHWC `images`; returns the number of BN layers."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    if len(images) == 0:
        raise UserError("BN recalibration: the calibration set is empty; give at least one image (--images)")
    model.eval()
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs by its count
        m.train()
    device = next(model.parameters()).device
    try:
        for i in tqdm(range(0, len(images), batch_size), desc="BN statistics", unit="batch", disable=not progress):
            model(to_float(images[i:i + batch_size]).to(device))
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom
        model.eval()
    return len(bns)


def has_placeholder_bn(model: nn.Module) -> bool:
    """True when the model has BN layers and every one still holds torch's initial statistics (mean 0, var 1)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) and m.running_mean is not None]
    return bool(bns) and all(bool((m.running_mean == 0).all() and (m.running_var == 1).all()) for m in bns)


def fold_weights(w: torch.Tensor, b: torch.Tensor | None, bn: nn.BatchNorm2d | nn.BatchNorm1d
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(w', b') of the conv (or Linear) that equals layer(w, b) followed by `bn` in eval mode."""
    w64 = w.detach().double()
    b64 = b.detach().double() if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(b64)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(b64)
    factor = gamma / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    w_f = w64 * factor.view(-1, *([1] * (w.dim() - 1)))
    b_f = (b64 - bn.running_mean.detach().double()) * factor + beta
    return w_f.to(w.dtype), b_f.to(w.dtype)


# (layer, the BN after it that folds into it): conv → BatchNorm2d, and Linear → BatchNorm1d on its [N, C] output
# (the "BN neck" of face-recognition and MLP heads)
FOLDABLE = ((nn.Conv2d, nn.BatchNorm2d), (nn.Linear, nn.BatchNorm1d))


def fold_conv_bn(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold every conv → BatchNorm2d and Linear → BatchNorm1d pair of a traced module in place (the BN node
    disappears)."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        layer_type = next((lt for lt, bt in FOLDABLE if type(bn) is bt), None)
        if layer_type is None:
            continue
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module"
                and isinstance(modules.get(prev.target), layer_type) and len(prev.users) == 1):
            continue  # a BN that does not follow its layer is reported by the converter
        conv = modules[prev.target]
        if bn.running_mean is None or bn.running_var is None:
            raise UserError(f"{node.target}: BatchNorm without running statistics cannot be folded; "
                            "use --bn-recalibrate or a model with track_running_stats=True")
        w, b = fold_weights(conv.weight, conv.bias, bn)
        if isinstance(conv, nn.Linear):
            fused = nn.Linear(conv.in_features, conv.out_features, bias=True)
        else:
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
        fused.weight.data.copy_(w)
        fused.bias.data.copy_(b)
        _set_module(gm, prev.target, fused)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _set_module(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
