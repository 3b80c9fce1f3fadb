#!/usr/bin/env python3
"""Attention: forward, backward and forward+backward TFLOP/s and peak memory for Sparrow's triton and cuda
backends, torch SDPA with each of its backends (flash, efficient, cuDNN) and flash-attention (when installed).

    python benchmarks/bench_attention.py            # batch x seqlen = 16k tokens, seqlen 512-16k, hd 64/128
    python benchmarks/bench_attention.py --quick    # a few small shapes (runs on a CPU too, slowly)
    python benchmarks/bench_attention.py --seqlens 1024,4096,16384 --head-dims 128   # a shorter sweep

FLOPs counted as flash-attention's benchmarks do: 4 * B * H * T^2 * D for the forward (two matmuls), halved
when causal; the backward is 2.5x the forward (five matmuls, one of them the recomputed QK^T).
Heads: 2048 / head_dim query heads (hidden 2048), no GQA, so every implementation runs the same problem.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import device_info, model_ms, parse_ints, peak_memory_mib, print_table, time_fn  # noqa: E402
from benchmarks.common import write_results  # noqa: E402
from sparrow import ops  # noqa: E402
from sparrow.ops import reference  # noqa: E402
from sparrow.testing import max_error  # noqa: E402

TOKENS = 16384
HIDDEN = 2048


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, causal):
        # SDPA wants (B, H, T, D); the transposes are views, as a model using SDPA would pass them.
        with sdpa_kernel(backend):
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return out.transpose(1, 2)

    return run


def implementations(device: str) -> dict:
    impls = {}
    for backend in ("triton", "cuda"):
        if ops.backend_error(backend) is None:
            impls[f"sparrow-{backend}"] = (lambda b: lambda q, k, v, causal: ops.attention(q, k, v, causal, backend=b))(backend)
    if device == "cuda":
        from torch.nn.attention import SDPBackend

        impls["sdpa-flash"] = _sdpa(SDPBackend.FLASH_ATTENTION)
        impls["sdpa-efficient"] = _sdpa(SDPBackend.EFFICIENT_ATTENTION)
        impls["sdpa-cudnn"] = _sdpa(SDPBackend.CUDNN_ATTENTION)
        try:
            from flash_attn import flash_attn_func

            impls["flash-attn"] = lambda q, k, v, causal: flash_attn_func(q, k, v, causal=causal)
        except ImportError:
            pass
    else:
        impls["reference"] = lambda q, k, v, causal: reference.attention(q, k, v, causal)
    return impls


def _shape_label(head_dim: int, causal: bool, seq: int) -> str:
    return f"hd{head_dim}-{'causal' if causal else 'full'}-{seq}"


PLOT = {"x": "shape", "series": "impl", "y": ["fwd_tflops", "bwd_tflops"]}


def _progress(row: dict) -> None:
    label = f"attention {row['impl']} {row['shape']}"
    if "error" in row:
        print(f"{label}: {row['error']}", flush=True)
    else:
        print(f"{label}: fwd {row['fwd_tflops']:.0f} bwd {row['bwd_tflops']:.0f} TFLOP/s", flush=True)


def _flops(batch, seq, heads, head_dim, causal) -> float:
    fwd = 4.0 * batch * heads * seq * seq * head_dim
    return fwd / 2 if causal else fwd


def bench_one(name, fn, batch, seq, head_dim, causal, dtype, device, warmup, rep) -> dict:
    heads = HIDDEN // head_dim
    row = dict(impl=name, seqlen=seq, batch=batch, heads=heads, head_dim=head_dim, causal=causal,
               shape=_shape_label(head_dim, causal, seq))
    q, k, v = (torch.randn(batch, seq, heads, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    try:
        out = fn(q, k, v, causal)
        # A quick sanity check on the first rows, so a broken kernel cannot post a fast time.
        n = min(seq, 256)
        exact = reference.attention(q[:1, :n].float(), k[:1, :n].float(), v[:1, :n].float(), causal)
        if causal and max_error(out[:1, :n].float(), exact) > 5e-2:
            raise RuntimeError("output does not match the reference")
    except Exception as exc:  # an SDPA backend without a kernel for this shape/GPU, an unsupported head dim
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        return row
    grad = torch.randn_like(out)

    def fwd():
        with torch.no_grad():
            fn(q, k, v, causal)

    def fwd_bwd():
        torch.autograd.grad(fn(q, k, v, causal), (q, k, v), grad)

    out = fn(q, k, v, causal)

    def bwd():
        torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)

    flops = _flops(batch, seq, heads, head_dim, causal)
    row["fwd_ms"] = time_fn(fwd, warmup, rep)
    row["bwd_ms"] = time_fn(bwd, warmup, rep)
    row["fwd_bwd_ms"] = time_fn(fwd_bwd, warmup, rep)
    row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
    row["bwd_tflops"] = 2.5 * flops / row["bwd_ms"] / 1e9
    row["fwd_bwd_tflops"] = 3.5 * flops / row["fwd_bwd_ms"] / 1e9
    shape = dict(batch=batch, seq=seq, heads=heads, kv_heads=heads, head_dim=head_dim, causal=causal)
    row["fwd_model_ms"] = model_ms("attention.fwd", **shape)
    row["bwd_model_ms"] = model_ms("attention.bwd", **shape)
    row["fwd_peak_mib"] = peak_memory_mib(fwd)
    row["fwd_bwd_peak_mib"] = peak_memory_mib(fwd_bwd)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes")
    p.add_argument("--out", help="JSON path (default benchmarks/results/<device>/attention.json)")
    p.add_argument("--impl", action="append", help="only these implementations (repeatable)")
    p.add_argument("--seqlens", type=parse_ints, help="comma-separated sequence lengths instead of the default sweep")
    p.add_argument("--head-dims", type=parse_ints, help="comma-separated head dims instead of the default 64,128")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    if args.quick:
        seqlens, head_dims, tokens, warmup, rep = [128, 512], [64], 1024, 5, 20
    else:
        seqlens, head_dims, tokens, warmup, rep = [512, 1024, 2048, 4096, 8192, 16384], [64, 128], TOKENS, 25, 100
    seqlens, head_dims = args.seqlens or seqlens, args.head_dims or head_dims
    meta = device_info()
    meta.update(dtype=str(dtype).removeprefix("torch."), tokens=tokens, hidden=HIDDEN, quick=args.quick,
                flops="fwd 4*B*H*T^2*D (/2 causal), bwd 2.5x fwd")
    impls = implementations(device)
    if args.impl:
        impls = {k: v for k, v in impls.items() if k in args.impl}
    rows = []
    for head_dim in head_dims:
        for causal in (True, False):
            for seq in seqlens:
                batch = max(tokens // seq, 1)
                for name, fn in impls.items():
                    rows.append(bench_one(name, fn, batch, seq, head_dim, causal, dtype, device, warmup, rep))
                    # Written after every row: a run stopped at a time limit keeps what it measured.
                    write_results("attention", rows, meta, out=args.out, plot=PLOT)
                    _progress(rows[-1])
                    if device == "cuda":
                        torch.cuda.empty_cache()
    path = write_results("attention", rows, meta, out=args.out, plot=PLOT)
    print_table(rows, ["impl", "head_dim", "causal", "seqlen", "fwd_tflops", "bwd_tflops", "fwd_bwd_tflops",
                       "fwd_ms", "fwd_model_ms", "bwd_ms", "bwd_model_ms", "fwd_bwd_peak_mib", "error"])
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
