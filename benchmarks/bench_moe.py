#!/usr/bin/env python3
"""Mixture-of-experts layer (softmax top-k router + routed SwiGLU experts): forward, backward and forward+backward
time, tokens/s, TFLOP/s of the expert matmuls and peak memory, for Sparrow's triton backend (one grouped GEMM launch
per projection over the expert-sorted tokens) against the reference loop over experts and against a dense SwiGLU MLP
with the same active parameters (intermediate size k * expert size). The router runs in every MoE variant.

    python benchmarks/bench_moe.py            # GPU shapes: moe-500m's layer and a Qwen3-30B-A3B-like one (128 experts, 8 active)
    python benchmarks/bench_moe.py --quick    # small shapes (runs on a CPU too: reference and dense only)

FLOPs counted: 2 * tokens * k * 3 * hidden * expert_size for the forward, twice that for the backward.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import device_info, print_table, time_fwd_bwd, write_results  # noqa: E402
from sparrow import ops  # noqa: E402
from sparrow.testing import max_error  # noqa: E402


def moe_layer(backend: str, k: int):
    def run(x, router, w_gate_up, w_down):
        probs = torch.softmax((x @ router.t()).float(), dim=-1)
        weights, ids = torch.topk(probs, k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        # As the model: topk's ids are in range, so no host sync to check them.
        return ops.moe_experts(x, ids, weights.to(x.dtype), w_gate_up, w_down, backend=backend, check_ids=False)

    return run


def dense_mlp(x, gate_up, down):
    inter = down.shape[1]
    h = x @ gate_up.t()
    return (F.silu(h[:, :inter]) * h[:, inter:]) @ down.t()


def bench_shape(tokens, hidden, inter, experts, k, dtype, device, impls, peak, warmup, rep):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=g)
    router = (torch.randn(experts, hidden, device=device, generator=g) / hidden**0.5).to(dtype)
    w_gate_up = (torch.randn(experts, 2 * inter, hidden, device=device, generator=g) / hidden**0.5).to(dtype)
    w_down = (torch.randn(experts, hidden, inter, device=device, generator=g) / inter**0.5).to(dtype)
    dense = [(torch.randn(2 * k * inter, hidden, device=device, generator=g) / hidden**0.5).to(dtype),
             (torch.randn(hidden, k * inter, device=device, generator=g) / (k * inter)**0.5).to(dtype)]
    flops = 2 * tokens * k * 3 * hidden * inter
    expected = None
    rows = []
    for name in impls:
        row = {"impl": name, "tokens": tokens, "hidden": hidden, "expert_size": inter, "experts": experts, "k": k,
               "shape": f"{tokens}t h{hidden} {experts}x{inter} top{k}"}
        if name == "dense":
            leaves = [x.detach().clone().requires_grad_(), *[w.detach().clone().requires_grad_() for w in dense]]
            forward = lambda: dense_mlp(x, *dense)  # noqa: E731
            with_grad = lambda: dense_mlp(*leaves)  # noqa: E731
        else:
            fn = moe_layer(name, k)
            args = (x, router, w_gate_up, w_down)
            leaves = [t.detach().clone().requires_grad_() for t in args]
            try:
                with torch.no_grad():
                    got = fn(*args)
                if expected is None:
                    expected = moe_layer("reference", k)(*args)
                row["max_err_vs_reference"] = max_error(got, expected)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"[:200]
                rows.append(row)
                continue
            forward = (lambda f, a: lambda: f(*a))(fn, args)
            with_grad = (lambda f, a: lambda: f(*a))(fn, leaves)
        weight_bytes = (3 * hidden * inter * (experts if name != "dense" else k)) * x.element_size()
        moved = weight_bytes + 2 * x.numel() * x.element_size()
        row.update(time_fwd_bwd(forward, with_grad, leaves, moved, 2 * moved, peak, warmup, rep))
        row["tokens_per_s"] = tokens / (row["fwd_bwd_ms"] * 1e-3)
        row["fwd_tflops"] = flops / (row["fwd_ms"] * 1e-3) / 1e12
        row["fwd_bwd_tflops"] = 3 * flops / (row["fwd_bwd_ms"] * 1e-3) / 1e12
        rows.append(row)
        print(f"moe {name} {row['shape']}: fwd {row['fwd_ms']:.3f} ms, fwd+bwd {row['fwd_bwd_ms']:.3f} ms, "
              f"{row['tokens_per_s']:.0f} tok/s", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--impls", default=None, help="comma-separated subset of reference,triton,dense")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>/moe.json)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    # (tokens, hidden, expert size, experts, k)
    if args.quick or device == "cpu":
        shapes = [(2048, 768, 2048, 8, 2)] if device == "cuda" else [(512, 128, 192, 8, 2), (1024, 256, 256, 16, 4)]
        warmup, rep = 10, 200
    else:
        shapes = [(t, 768, 2048, 8, 2) for t in (4096, 16384)] + [(t, 2048, 768, 128, 8) for t in (4096, 16384)]
        warmup, rep = 25, 100
    impls = ["reference", "dense"]
    if ops.backend_error("triton") is None and device == "cuda":  # the CPU interpreter measures Python, not the kernel
        impls.insert(1, "triton")
    if args.impls:
        impls = [i for i in impls if i in args.impls.split(",")]
    meta = device_info()
    meta.update(dtype=str(dtype).removeprefix("torch."), quick=args.quick)
    rows = []
    for shape in shapes:
        rows += bench_shape(*shape, dtype, device, impls, meta.get("peak_bandwidth_gbs"), warmup, rep)
    path = write_results("moe", rows, meta, out=args.out,
                         plot={"x": "shape", "series": "impl", "y": ["tokens_per_s", "fwd_bwd_tflops"]})
    print(f"\nMoE layer, {meta['dtype']}, {meta['device']}")
    print_table(rows, ["impl", "shape", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "tokens_per_s", "fwd_bwd_tflops",
                       "peak_mem_mib", "max_err_vs_reference", "error"])
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
