"""Small real inputs for the training and generation tests: a few files copied from this Python's standard library,
and a tiny Llama folder with a real tokenizer."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

# The key of each document is "corpus/<name>", so a test's train/validation split by file is fixed.
STDLIB_FILES = ["bisect.py", "heapq.py", "textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "colorsys.py",
                "string.py", "queue.py", "sched.py", "keyword.py", "copy.py", "abc.py", "numbers.py"]


def stdlib_corpus(folder: Path, names: list[str] = STDLIB_FILES) -> Path:
    """``folder/corpus`` holding copies of the named standard-library files; returns that directory."""
    root = folder / "corpus"
    root.mkdir()
    std = Path(sysconfig.get_paths()["stdlib"])
    for name in names:
        shutil.copy(std / name, root / name)
    return root


def tiny_llama_folder(folder: Path, hidden: int = 32, intermediate: int = 64):
    """A freshly initialized 2-block Llama saved in ``folder`` with MiniLM's word-piece tokenizer (offline), as an HF
    model folder; returns the model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from structmat.data.corpus import minilm_tokenizer

    tok = minilm_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model
