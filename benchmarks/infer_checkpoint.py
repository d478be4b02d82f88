"""A `structmat compress` checkpoint of the `structmat bench infer` shape, for its ``--checkpoint`` row (issue 12).

    PYTHONPATH=src python benchmarks/infer_checkpoint.py --work /tmp/ckpt [--structure lowrank@whitened]
    structmat bench infer --checkpoint /tmp/ckpt/compressed/target-0.50 ...

1. the dense bench-shape Llama (hidden 2048 / SwiGLU 8192 / 8 layers / vocab 32000, bf16, seeded random weights:
   no pretrained model of this shape is offline) saved as an HF folder, with a byte-level BPE tokenizer of 32000
   tokens trained on a slice of the Python standard library (structmat's own tokenizer trainer);
2. ``structmat compress --structure <structure> --target-params 0.5`` on it, calibrated on standard-library text,
   on the GPU; its output folder is what ``load_pretrained`` reads back in the bench.
Prints the compressed folder's path last.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="folder for the dense and the compressed model")
    ap.add_argument("--structure", default="lowrank@whitened")
    ap.add_argument("--target", default="0.5")
    ap.add_argument("--calib-samples", default="64")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="a tiny model (a smoke run, CPU is fine)")
    ap.add_argument("--tokenizer-files", type=int, default=300, help="standard-library files to train the BPE on")
    args = ap.parse_args()

    import torch
    from transformers import PreTrainedTokenizerFast

    from structmat.bench import infer
    from structmat.cli import main as cli_main
    from structmat.data.corpus import corpus_files
    from structmat.train.tokenizer import bpe_tokenizer

    work = Path(args.work)
    dense = work / "dense"
    docs = sorted(corpus_files(), key=lambda d: str(getattr(d, "key", d)))[: args.tokenizer_files]
    shape = dict(infer.SHAPE)
    if args.quick:
        shape.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=1000)
    tok = bpe_tokenizer(docs, shape["vocab_size"], cache_dir=work / "cache")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    model = infer.build(None, torch.bfloat16, shape, device=args.device)
    model.config.eos_token_id = model.config.pad_token_id = fast.eos_token_id
    model.save_pretrained(dense)
    fast.save_pretrained(dense)
    del model
    out = work / "compressed"
    rc = cli_main(["compress", "--model", str(dense), "--structure", args.structure, "--target-params", args.target,
                   "--calib-samples", args.calib_samples, *(["--seq-len", "32"] if args.quick else []), "--device", args.device, "--no-eval", "--out", str(out)])
    if rc:
        return rc
    folder = next(out.glob("target-*"))
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
