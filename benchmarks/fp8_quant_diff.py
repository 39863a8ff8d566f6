"""Where the Triton row-wise FP8 quantisation (kernels/fp8.py) and its eager twin differ, on this GPU.

    python -m benchmarks.fp8_quant_diff [rows] [cols]

Prints one JSON line: how many scales and e4m3 values differ, by how much (in e4m3 steps), and a few examples
(x, scale, x/scale, both results). Used to pin down a GPU-only mismatch the interpreter tests cannot see.
"""
from __future__ import annotations

import json
import sys

import torch

from kernels.fp8 import quantize_rowwise, quantize_rowwise_triton


def main(argv: list[str]) -> int:
    rows, cols = (int(argv[0]), int(argv[1])) if len(argv) >= 2 else (1024, 5120)
    torch.manual_seed(0)
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)  # [M, K]
    q, s = quantize_rowwise_triton(x)
    q_ref, s_ref = quantize_rowwise(x)
    ds = (s != s_ref).flatten()
    dq = q.float() != q_ref.float()
    out = {"rows": rows, "cols": cols, "scale_mismatches": int(ds.sum()),
           "scale_max_rel": float(((s - s_ref).abs() / s_ref).max()),
           "value_mismatches": int(dq.sum()), "values": rows * cols,
           "value_mismatches_in_rows_with_equal_scale": int(dq[~ds].sum())}
    idx = dq.nonzero()[:8]
    ex = []
    for r, c in idx.tolist():
        xv = x[r, c].float()
        ex.append({"x": float(xv), "scale": float(s[r]), "scale_ref": float(s_ref[r]),
                   "x_over_scale": float(xv / s_ref[r]), "triton": float(q[r, c].float()),
                   "eager": float(q_ref[r, c].float())})
    out["examples"] = ex
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
