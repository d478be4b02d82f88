"""structmat: structured matrices as first-class PyTorch layers."""

from .structures import *  # noqa: F401,F403  (the structure API is listed in structures.__all__)
from .structures import __all__ as _structure_api

__version__ = "0.1.0"

from . import kernels  # noqa: F401,E402  (registers the GPU fast paths; falls back to the reference without triton)
from .inference import merge_for_inference, unmerge_for_inference  # noqa: E402
from .siblings import fuse_siblings, unfuse_siblings  # noqa: E402
from .io import load_pretrained, save_pretrained  # noqa: E402
from .surgery import Plan, Report, Target, densify, structurize  # noqa: E402
from .adapters import adapt, load_adapter, merge, save_adapter, unmerge  # noqa: E402
from .compress import Compressor  # noqa: E402
from . import mixers  # noqa: F401,E402  (registers load_pretrained's build hook for mixer and hybrid models)

__all__ = [*_structure_api, "Plan", "Report", "Target", "structurize", "densify", "save_pretrained",
           "load_pretrained", "merge_for_inference", "unmerge_for_inference", "fuse_siblings", "unfuse_siblings",
           "adapt", "merge", "unmerge",
           "save_adapter", "load_adapter", "Compressor"]
