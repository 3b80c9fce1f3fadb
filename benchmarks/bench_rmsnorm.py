#!/usr/bin/env python3
"""RMSNorm and fused residual-add + RMSNorm: forward, backward and forward+backward time, effective bandwidth
and % of the device's peak, peak memory; Sparrow's triton and cuda backends against the eager reference, the
torch.compiled reference and Liger-Kernel (when installed). bf16 by default.

    python benchmarks/bench_rmsnorm.py            # tokens 4k-64k x hidden 1024-16384
    python benchmarks/bench_rmsnorm.py --quick    # small shapes (runs on a CPU too: reference and native CPU)
    python benchmarks/bench_rmsnorm.py --shapes 16384x2048,16384x8192   # tokens x hidden

Bytes counted are the minimum traffic: forward reads x (and residual) and writes y (and the sum); backward
reads dy, x (and the residual gradient) and writes dx. Weights, rstd and dW partials are left out, so the
percentage is of useful bandwidth.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import bandwidth_parser, device_info, print_fwd_bwd, report_bandwidth  # noqa: E402
from benchmarks.common import model_ms, save_bandwidth, select_impls, time_fwd_bwd  # noqa: E402
from sparrow import ops  # noqa: E402
from sparrow.ops import reference  # noqa: E402
from sparrow.testing import assert_close  # noqa: E402

# One compiled graph per shape (dynamic=False, the fastest code): allow more than dynamo's default 8, past which it
# would silently run the reference eagerly.
for _knob in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, _knob):
        setattr(torch._dynamo.config, _knob, 256)

EPS = 1e-6


def implementations(op: str, device: str) -> dict:
    impls = {"reference": getattr(reference, op)}
    impls["compiled"] = torch.compile(getattr(reference, op), dynamic=False)
    for backend in ("triton", "cuda"):
        if ops.backend_error(backend) is None:
            impls[backend] = (lambda b: lambda *a: getattr(ops, op)(*a, backend=b))(backend)
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        if device == "cuda":
            if op == "rms_norm":
                impls["liger"] = lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps)
            else:
                # Liger has no fused residual add here: the add is a separate PyTorch op, as in its models.
                impls["liger"] = lambda x, r, w, eps: (LigerRMSNormFunction.apply(x + r, w, eps), x + r)
    except ImportError:
        pass
    return impls


def bench_one(op: str, name: str, fn, tokens: int, hidden: int, dtype, device: str, peak, warmup: int, rep: int):
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    w = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    fused = op == "fused_add_rms_norm"
    r = torch.randn_like(x) if fused else None
    args = (x, r, w, EPS) if fused else (x, w, EPS)
    leaves = [t.detach().requires_grad_() for t in ((x, r, w) if fused else (x, w))]
    grad_args = (*leaves, EPS)

    def out_tensors(out):
        return out if isinstance(out, tuple) else (out,)

    try:
        with torch.no_grad():
            out = fn(*args)
        expected = getattr(reference, op)(*args)
        for a, b in zip(out_tensors(out), out_tensors(expected)):
            assert_close(a, b, name=f"{name} {op}")
    except Exception as exc:  # a backend that cannot take this shape: record why, keep going
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}
    elem = x.element_size()
    moved = tokens * hidden * elem
    fwd_bytes = (4 if fused else 2) * moved
    bwd_bytes = (4 if fused else 3) * moved  # fused: dy, d(sum), x+r (saved) read; one dx written
    row = time_fwd_bwd(lambda: fn(*args), lambda: fn(*grad_args), leaves, fwd_bytes, bwd_bytes, peak, warmup, rep)
    shape = dict(tokens=tokens, hidden=hidden, fused_add=fused, elem=elem)
    return dict(row, fwd_model_ms=model_ms("rms_norm.fwd", **shape), bwd_model_ms=model_ms("rms_norm.bwd", **shape))


def main(argv=None) -> int:
    p = bandwidth_parser(__doc__, "rmsnorm", "reference,compiled,triton,cuda,liger")
    p.add_argument("--ops", default="rms_norm,fused_add_rms_norm")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    if args.quick:
        shapes = [(4096, 1024), (4096, 4096)] if device == "cuda" else [(256, 1024), (128, 4096)]
        warmup, rep = (10, 30)
    else:
        shapes = [(t, h) for t in (4096, 16384, 65536) for h in (1024, 2048, 4096, 8192, 16384)]
        warmup, rep = (25, 100)
    shapes = args.shapes or shapes
    meta = device_info()
    meta.update(dtype=args.dtype, eps=EPS, quick=args.quick)
    peak = meta.get("peak_bandwidth_gbs")
    rows = []
    for op in args.ops.split(","):
        impls = select_impls(implementations(op, device), device, args.impls)
        for tokens, hidden in shapes:
            for name, fn in impls.items():
                row = {"op": op, "impl": name, "tokens": tokens, "hidden": hidden, "shape": f"{tokens}x{hidden}"}
                row.update(bench_one(op, name, fn, tokens, hidden, dtype, device, peak, warmup, rep))
                rows.append(row)
                save_bandwidth("rmsnorm", rows, meta, out=args.out)
                print_fwd_bwd(f"{op} {name} {tokens}x{hidden}", row)
    columns = ["op", "impl", "tokens", "hidden", "fwd_ms", "fwd_host_ms", "fwd_model_ms", "bwd_ms", "bwd_model_ms", "fwd_bwd_ms", "fwd_pct_peak", "bwd_pct_peak",
               "fwd_bwd_pct_peak", "peak_mem_mib", "error"]
    report_bandwidth("rmsnorm", "RMSNorm", rows, meta, columns, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
