"""convdsl: a compiler for convolutional networks written as .cnn files."""
from .compiler import load, load_source
from .errors import ConvDSLError

__all__ = ["ConvDSLError", "load", "load_source"]
__version__ = "0.1.0"
