"""ghnq: quantization-robust weights from a graph hypernetwork, shipped as integer-only int8 artifacts.

    import ghnq
    model = ghnq.predict(model, bits=8)   # fills any nn.Module's parameters in place (GHN-Q)
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__version__ = "0.1.0"

# Two import-time warnings of the pinned stack that say nothing about the user's model, printed by every
# command that imports torchao / executorch, even under --quiet: torchao 0.18 registers an Enum with torch's
# pytree (deprecated in torch 2.14), and torch's flop counter looks for triton (removed: STACK.md's segfault).
for _name in ("torch.utils._pytree", "torch.utils.flop_counter"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def predict(model: nn.Module, bits: int | str = 8, **kwargs: Any) -> nn.Module:
    """Predict quantization-robust parameters for `model` with the shipped GHN-Q checkpoint, in place."""
    from ghnq.predict import predict as _predict  # imported on use: `import ghnq` stays light

    return _predict(model, bits=bits, **kwargs)
