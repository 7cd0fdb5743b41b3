"""Where a model's float weights come from, decided in one place for calibration and every exporter.

Order: an explicit `--weights` file; else the shipped GHN-Q checkpoint (one forward pass, no training);
else a seeded random init, with a loud warning (accuracy will be chance level).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from ghnq.train import load_weights


def ghnq_checkpoint() -> Path | None:
    """The shipped GHN-Q checkpoint, when this build has one."""
    try:
        from ghnq.predict import default_checkpoint
    except ImportError:
        return None
    return default_checkpoint()


def obtain_weights(model: nn.Module, weights: str | Path | None = None, bits: int | str = 8, seed: int = 0,
                   quiet: bool = False) -> str:
    """Fill `model`'s parameters in place; return a one-line description of where they came from."""
    if weights is not None:
        load_weights(model, weights)
        return f"file {weights}"
    ckpt = ghnq_checkpoint()
    if ckpt is not None:
        from ghnq.predict import conditioning, predict

        predict(model, bits=bits, checkpoint=ckpt)
        cond = conditioning(bits)
        return f"GHN-Q prediction ({ckpt.name}, bits={bits}{'' if cond == str(bits) else f', conditioned on {cond}'})"
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    if not quiet:
        print("WARNING: no --weights given and no GHN-Q checkpoint shipped in this build: using a seeded random "
              f"init (seed {seed}); accuracy will be at chance level", file=sys.stderr)
    return f"random init (seed {seed})"
