"""Model folders for ``structmat generate`` at the issue-12 bench shape, for a GPU that has no packaged model: the
dense Llama of ``structmat bench infer`` (hidden 2048, SwiGLU 8192, 8 layers, random weights) and the same model
with every block linear structured, each saved (``save_pretrained``) with a synthetic word-level tokenizer of the
model's vocabulary (the text is meaningless; the speed and memory are the model's), so that

    structmat generate --model DIR/lowrank --baseline DIR/dense [--compile]

measures what a user's command measures. ``--shape tiny`` makes a small one (CPU check).

    PYTHONPATH=src python benchmarks/experiments/generate_folders.py --out DIR [--structures lowrank,monarch,...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _common  # noqa: F401  (puts src/ on the path)
import torch

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=512)


def tokenizer(vocab_size: int):
    """A word-level tokenizer of ``vocab_size`` entries: the printable words w0..wN, with [UNK] and [PAD]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", eos_token="[PAD]")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--structures", default="lowrank,monarch,blockdiag,nm24")
    ap.add_argument("--shape", choices=["bench", "tiny"], default="bench")
    ap.add_argument("--device", default="cpu", help="where the weights are drawn (cuda: faster at the bench shape)")
    args = ap.parse_args()

    import structmat
    from structmat.bench.infer import SHAPE, build

    shape = SHAPE if args.shape == "bench" else TINY
    tok = tokenizer(shape["vocab_size"])
    for name in ["dense", *[s for s in args.structures.split(",") if s]]:
        model = build(None if name == "dense" else name, torch.bfloat16, shape, device=args.device)
        folder = Path(args.out) / name
        tok.save_pretrained(folder)
        structmat.save_pretrained(model, folder)
        print(f"wrote {folder}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
