"""Adapters: a frozen base (dense or structured) plus a delta of any registered structure; merge / unmerge; files."""

from .core import (AdaptedLinear, AdaptReport, MergeReport, adapt, adapter_modules, adapter_parameters, merge,
                   unmerge)
from .files import load_adapter, load_peft_lora, save_adapter, save_peft_lora

__all__ = ["AdaptedLinear", "AdaptReport", "MergeReport", "adapt", "adapter_modules", "adapter_parameters", "merge",
           "unmerge", "save_adapter", "load_adapter", "save_peft_lora", "load_peft_lora"]
