"""2:4 on the sparse tensor cores (issue 12, session 16): does ``mma.sp`` as ``_gluon_nm24`` feeds it compute the
product, for positions stored in order within each group (p0 < p1) and out of order (p0 > p1)?

Run on the GPU machine:  ``PYTHONPATH=src python benchmarks/experiments/nm24_sparse_mma.py --out DIR``
For each (rows, inputs, tokens, dtype, order): relative RMS error of ``decode.nm`` (the sparse-tensor-core path, and
with it switched off) against the float64 product; ``--settings`` (JSON list of knob dicts of
``_triton_decode``) repeats the sparse-tensor-core case under each. Writes ``nm24-sparse-mma-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
from pathlib import Path

import _common  # noqa: F401  (src on the path)
import torch


def operands(out: int, inp: int, ordered: bool, gen: torch.Generator):
    from structmat.structures.sparse import pack_positions

    W = torch.randn(out, inp, generator=gen, dtype=torch.float64)
    pos = torch.rand(out, inp // 4, 4, generator=gen).argsort(-1)[..., :2]
    if ordered:
        pos = pos.sort(-1).values
    vals = W.reshape(out, inp // 4, 4).gather(2, pos)
    dense = torch.zeros(out, inp // 4, 4, dtype=torch.float64).scatter(2, pos, vals).reshape(out, inp)
    return vals.reshape(out, -1), pack_positions(pos.reshape(out, -1), 2), dense


def main() -> int:
    from structmat.kernels import _triton_decode as TD
    from structmat.kernels import decode

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--settings", default="[]")
    args = ap.parse_args()
    settings = json.loads(args.settings)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for out_f, in_f in ((24, 512), (200, 192), (2048, 2048), (8192, 2048), (2048, 8192)):
        for ordered in (True, False):
            vals, pos, dense = operands(out_f, in_f, ordered, gen)
            for n in (1, 3, 8, 9, 16, 17, 40, 64):
                x = torch.randn(n, in_f, generator=gen, dtype=torch.float64)
                ref = x @ dense.T
                for dtype in (torch.bfloat16, torch.float16):
                    row = dict(rows=out_f, inputs=in_f, tokens=n, dtype=str(dtype), ordered=ordered)
                    for sp in (True, False):
                        TD.NM24_SP[0] = sp
                        y = decode.nm(x.cuda().to(dtype), vals.cuda().to(dtype), pos.cuda(), 2, 4).double().cpu()
                        err = float((y - ref).norm() / ref.norm()) if torch.isfinite(y).all() else float("inf")
                        row["sp_err" if sp else "old_err"] = err
                    TD.NM24_SP[0] = True
                    for k, knobs in enumerate(settings):
                        saved = _common.set_knobs(TD, {key: tuple(v) if isinstance(v, list) else v
                                                       for key, v in knobs.items()})
                        y = decode.nm(x.cuda().to(dtype), vals.cuda().to(dtype), pos.cuda(), 2, 4).double().cpu()
                        row[f"sp_err@{k}"] = (float((y - ref).norm() / ref.norm()) if torch.isfinite(y).all()
                                              else float("inf"))
                        _common.restore_knobs(TD, saved)
                    rows.append(row)
                    print(row, flush=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.out) / f"nm24-sparse-mma-{stamp}.json"
    path.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), settings=settings, rows=rows), indent=1))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
