"""export: the QuantizedModel as integer-only artifacts (export.tflite, export.executorch)."""

import ghnq  # noqa: F401  first: its __init__ quiets two import-time warnings of torchao / torch (see there)
