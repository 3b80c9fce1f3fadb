#!/usr/bin/env python3
"""RoPE (q and k together, GQA): forward, backward and forward+backward time, effective bandwidth and % of
the device's peak, peak memory; Sparrow's triton and cuda backends against the eager reference, the
torch.compiled reference and Liger-Kernel (when installed). bf16, per-token cos/sin (packed documents).

    python benchmarks/bench_rope.py            # tokens 4k-64k x (heads * head_dim) 1024-16384
    python benchmarks/bench_rope.py --quick    # small shapes (runs on a CPU too)
    python benchmarks/bench_rope.py --shapes 4x4096x16,8x8192x32   # batch x seq x query heads

Bytes counted: q and k read and written once each way, plus the cos/sin rows.
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

HEAD_DIM = 128
KV_HEADS = 8


def implementations(device: str) -> dict:
    impls = {"reference": reference.apply_rope, "compiled": torch.compile(reference.apply_rope, dynamic=False)}
    for backend in ("triton", "cuda"):
        if ops.backend_error(backend) is None:
            impls[backend] = (lambda b: lambda q, k, c, s: ops.apply_rope(q, k, c, s, backend=b))(backend)
    try:
        from liger_kernel.ops.rope import LigerRopeFunction

        if device == "cuda":
            def liger(q, k, cos, sin):
                # Liger wants (batch, heads, seq, head_dim) and full-width cos/sin; the layout change is a view.
                # It writes the rotation into q and k themselves: timed as it runs, in place.
                full_cos, full_sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
                qo, ko = LigerRopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2), full_cos, full_sin)
                return qo.transpose(1, 2), ko.transpose(1, 2)

            impls["liger"] = liger
    except ImportError:
        pass
    return impls


def bench_one(name, fn, batch, seq, heads, dtype, device, peak, warmup, rep):
    q = torch.randn(batch, seq, heads, HEAD_DIM, device=device, dtype=dtype)
    k = torch.randn(batch, seq, KV_HEADS, HEAD_DIM, device=device, dtype=dtype)
    positions = torch.arange(seq, device=device).remainder(2048).expand(batch, seq)
    half = HEAD_DIM // 2
    angles = positions[..., None].float() * (1.0 / 10000 ** (torch.arange(half, device=device) / half))
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    try:
        expected = reference.apply_rope(q, k, cos, sin)
        with torch.no_grad():
            # Clones: Liger rotates contiguous (batch, seq, heads, dim) inputs in place (its .contiguous() is then
            # no copy), which would hand the reference already-rotated q and k.
            got = fn(q.clone(), k.clone(), cos, sin)
        for a, b in zip(got, expected):
            assert_close(a, b, name=name)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}
    elem = q.element_size()
    qk_bytes = 2 * (q.numel() + k.numel()) * elem
    table_bytes = 2 * cos.numel() * elem
    ql, kl = q.detach().requires_grad_(), k.detach().requires_grad_()
    # The backward reads the output gradients and writes the input gradients: the forward's traffic again.
    moved = qk_bytes + table_bytes
    row = time_fwd_bwd(lambda: fn(q, k, cos, sin), lambda: fn(ql, kl, cos, sin), [ql, kl], moved, moved, peak, warmup,
                       rep)
    # The backward is the same rotation by the negated angle: the same model time.
    predicted = model_ms("rope", tokens=batch * seq, heads=heads, kv_heads=KV_HEADS, head_dim=HEAD_DIM, elem=elem)
    return dict(row, fwd_model_ms=predicted, bwd_model_ms=predicted)


def main(argv=None) -> int:
    p = bandwidth_parser(__doc__, "rope", "reference,compiled,triton,cuda,liger")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    # (batch, seq) x q heads: hidden = heads * 128 from 1024 to 16384, kv heads fixed at 8 (GQA).
    if args.quick:
        shapes = [(1, 4096, 8), (1, 4096, 32)] if device == "cuda" else [(1, 64, 8), (2, 32, 32)]
        warmup, rep = 10, 30
    else:
        shapes = [(b, s, h) for b, s in ((1, 4096), (4, 4096), (8, 8192)) for h in (8, 16, 32, 64, 128)]
        warmup, rep = 25, 100
    shapes = args.shapes or shapes
    meta = device_info()
    meta.update(dtype=args.dtype, head_dim=HEAD_DIM, kv_heads=KV_HEADS, quick=args.quick)
    peak = meta.get("peak_bandwidth_gbs")
    impls = select_impls(implementations(device), device, args.impls)
    rows = []
    for batch, seq, heads in shapes:
        for name, fn in impls.items():
            row = {"impl": name, "tokens": batch * seq, "heads": heads, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                   "hidden": heads * HEAD_DIM, "shape": f"{batch * seq}x{heads}x{HEAD_DIM}"}
            row.update(bench_one(name, fn, batch, seq, heads, dtype, device, peak, warmup, rep))
            rows.append(row)
            save_bandwidth("rope", rows, meta, out=args.out)
            print_fwd_bwd(f"rope {name} {row['shape']}", row)
    report_bandwidth("rope", "RoPE", rows, meta, ["impl", "tokens", "hidden", "fwd_ms", "fwd_host_ms", "fwd_model_ms", "bwd_ms", "bwd_model_ms", "fwd_bwd_ms",
                     "fwd_pct_peak", "bwd_pct_peak", "fwd_bwd_pct_peak", "peak_mem_mib", "error"], out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
