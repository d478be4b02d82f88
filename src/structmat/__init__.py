"""structmat: structured matrices as first-class PyTorch layers."""

from .structures import *  # noqa: F401,F403  (the public API is listed in structures.__all__)
from .structures import __all__

__version__ = "0.1.0"

from . import kernels  # noqa: F401,E402  (registers the GPU fast paths; falls back to the reference without triton)
