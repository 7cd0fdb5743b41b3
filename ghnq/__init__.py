"""ghnq: quantization-robust weights from a graph hypernetwork, shipped as integer-only int8 artifacts.

    import ghnq
    model = ghnq.predict(model, bits=8)   # fills any nn.Module's parameters in place (GHN-Q)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__version__ = "0.1.0"


def predict(model: nn.Module, bits: int | str = 8, **kwargs: Any) -> nn.Module:
    """Predict quantization-robust parameters for `model` with the shipped GHN-Q checkpoint, in place."""
    from ghnq.predict import predict as _predict  # imported on use: `import ghnq` stays light

    return _predict(model, bits=bits, **kwargs)
