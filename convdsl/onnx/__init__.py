"""ONNX in and out: `convdsl export` (a checked graph → an ONNX model) and `convdsl import`
(an ONNX model → a readable .cnn file and its weights). Both need the `onnx` extra."""
from __future__ import annotations

from ..errors import ConvDSLError

OPSET = 17


def require_onnx():
    """The onnx package, or an error that says how to get it (never an ImportError traceback)."""
    try:
        import onnx
    except ImportError:
        raise ConvDSLError(None, "ONNX support needs the `onnx` package: pip install 'convdsl[onnx]'") from None
    return onnx
