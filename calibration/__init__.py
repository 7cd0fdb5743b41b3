"""calibration: float model → one QuantizedModel (every scale and zero point), its fake-quant simulation
and its bit-exact integer reference.

    qm = calibrate(model, images_uint8, method="minmax", weight_bits=8, act_bits=8)
    codes = simulate(qm, images_uint8)                 # torch fake-quant, int8 logit codes
    codes = reference.run(qm, images_uint8)            # numpy integer reference (TFLite reference kernels)
    save(qm, "model.qm"); qm = load("model.qm")
"""

from __future__ import annotations

import numpy as np
from torch import nn

import ghnq  # noqa: F401  first: its __init__ quiets two import-time warnings of torchao / torch (see there)
from calibration import reference
from calibration.bn import BN_BATCH, has_placeholder_bn, recalibrate_bn
from calibration.convert import float_graph, fold_input_normalization, observe, quantize
from calibration.qmodel import Op, QuantizedModel, Tensor, load, save
from calibration.sim import Simulator, simulate
from ghnq.cli import UserError

__all__ = ["calibrate", "simulate", "Simulator", "reference", "QuantizedModel", "Op", "Tensor", "load", "save"]


def calibrate(model: nn.Module, images: np.ndarray, method: str = "minmax", weight_bits: int = 8,
              act_bits: int = 8, bn_recalibrate: bool | None = None, batch_size: int = BN_BATCH,
              progress: bool = True, meta: dict | None = None) -> QuantizedModel:
    """Quantize a float model on uint8 NHWC calibration images; the model itself is not modified
    (except its BN statistics when they are re-estimated).

    `bn_recalibrate=None` (default) re-estimates BN statistics when every BN still holds its placeholder
    statistics (mean 0, variance 1: a fresh module, or one `ghnq.predict` just filled), and keeps trained ones.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) == 0:
        raise UserError(f"calibration images: got {images.dtype} array of shape {list(images.shape)}; "
                        "need a non-empty uint8 NHWC array [N, H, W, 3]")
    if bn_recalibrate is None:
        bn_recalibrate = has_placeholder_bn(model)
    if bn_recalibrate:
        recalibrate_bn(model, images, batch_size=batch_size, progress=progress)
    model.eval()
    g = float_graph(model, [images.shape[3], images.shape[1], images.shape[2]])
    fold_input_normalization(g)
    qparams = observe(g, images, method, act_bits, batch_size=batch_size, progress=progress)
    info = {"method": method, "weight_bits": weight_bits, "act_bits": act_bits, "calibration_images": len(images),
            "bn_recalibrated": bool(bn_recalibrate)}
    spec = getattr(model, "spec", None)
    if spec is not None:
        info["spec"] = spec
    info.update(meta or {})
    return quantize(g, qparams, weight_bits, act_bits, info)
