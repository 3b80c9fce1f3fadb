#!/usr/bin/env python3
"""Host time of one Sparrow op call, kernels left out: what the GPU waits on at small shapes and in
decoding. The Triton launchers are replaced by stubs that return empty outputs, so what is timed is Sparrow's
Python around a launch (the cuda backend's native ops, which cannot be stubbed, run their kernels at tiny
shapes): through torch's dispatcher (the custom op called as such, what every eager call paid
before custom_ops.fast_path) against the fast path (the kernel function directly without gradients, an
autograd.Function with them), and the whole public call (`sparrow.ops.*`: argument checks, backend resolution,
fast path). Runs anywhere: CUDA tensors on a GPU, CPU tensors with TRITON_INTERPRET=1 otherwise.

    python benchmarks/bench_dispatch.py [--quick] [--calls 20000] [--out PATH]

Writes benchmarks/results/<device>/dispatch.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton backend takes CPU tensors only then

from benchmarks.common import device_info, print_table, write_results  # noqa: E402
from sparrow import ops  # noqa: E402


def per_call_us(fn, calls: int) -> float:
    """Median over 5 runs of ``calls`` calls, microseconds per call."""
    for _ in range(min(calls, 500)):
        fn()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(runs)[2]


def stub_kernels() -> None:
    """Launchers that allocate their outputs and launch nothing."""
    from sparrow.kernels import decode, rms_norm, rope

    def rms_fwd(x, weight, eps, residual=None, **_):
        return torch.empty_like(x), (torch.empty_like(x) if residual is not None else None), \
            x.new_empty(x.shape[0], dtype=torch.float32)

    rms_norm.rms_norm_fwd = rms_fwd
    rms_norm.rms_norm_bwd = lambda grad_y, x, weight, rstd, grad_sum=None, **_: (torch.empty_like(x),
                                                                                 torch.empty_like(weight))
    rope.rope = lambda q, k, cos, sin, backward=False, **_: (torch.empty_like(q), torch.empty_like(k))
    decode.decode_attention = lambda q, k_cache, v_cache, lengths, scale: torch.empty_like(q)


def cases(device: str, dtype: torch.dtype):
    """(op, public call, fast-path call, custom-op call, tensors that may require grad)."""
    from sparrow.ops import triton_attention as ta
    from sparrow.ops import triton_backend as tb

    x = torch.randn(8, 256, device=device, dtype=dtype)
    w = torch.ones(256, device=device, dtype=dtype)
    r = torch.randn_like(x)
    q = torch.randn(1, 8, 4, 64, device=device, dtype=dtype)
    k = torch.randn(1, 8, 2, 64, device=device, dtype=dtype)
    cos, sin = (torch.randn(8, 32, device=device, dtype=dtype) for _ in range(2))
    qd = torch.randn(2, 1, 4, 64, device=device, dtype=dtype)
    kc, vc = (torch.randn(2, 64, 2, 64, device=device, dtype=dtype) for _ in range(2))
    lengths = torch.tensor([9, 64], dtype=torch.int32, device=device)
    yield ("rms_norm", lambda: ops.rms_norm(x, w, 1e-6, backend="triton"),
           lambda: tb._rms_norm_fwd_fast(x, w, 1e-6), lambda: tb._rms_norm_fwd(x, w, 1e-6), (x, w))
    yield ("fused_add_rms_norm", lambda: ops.fused_add_rms_norm(x, r, w, 1e-6, backend="triton"),
           lambda: tb._fused_add_rms_norm_fwd_fast(x, r, w, 1e-6), lambda: tb._fused_add_rms_norm_fwd(x, r, w, 1e-6),
           (x, r, w))
    yield ("apply_rope", lambda: ops.apply_rope(q, k, cos, sin, backend="triton"),
           lambda: tb._rope_fast(q, k, cos, sin, False), lambda: tb._rope_op(q, k, cos, sin, False), (q, k))
    if ops.backend_error("cuda") is None:
        # Native ops cannot be stubbed: their kernels run (tiny shapes, float32 on a CPU), the same in each column.
        from sparrow.ops import cuda_backend as cb

        native_dtype = torch.float32 if device == "cpu" else dtype
        xf, wf, rf, qf, kf, cf, sf = (t.detach().to(native_dtype).clone() for t in (x, w, r, q, k, cos, sin))
        native = torch.ops.sparrow_C
        yield ("cuda rms_norm", lambda: ops.rms_norm(xf, wf, 1e-6, backend="cuda"),
               lambda: cb._rms_norm_fwd(xf, wf, 1e-6), lambda: native.rms_norm_fwd(xf, wf, 1e-6), (xf, wf))
        yield ("cuda fused_add_rms_norm", lambda: ops.fused_add_rms_norm(xf, rf, wf, 1e-6, backend="cuda"),
               lambda: cb._fused_add_rms_norm_fwd(xf, rf, wf, 1e-6),
               lambda: native.fused_add_rms_norm_fwd(xf, rf, wf, 1e-6), (xf, rf, wf))
        yield ("cuda apply_rope", lambda: ops.apply_rope(qf, kf, cf, sf, backend="cuda"),
               lambda: cb._rope(qf, kf, cf, sf, False), lambda: native.rope(qf, kf, cf, sf, False), (qf, kf))
    yield ("attention_with_kv_cache",
           lambda: ops.attention_with_kv_cache(qd, kc, vc, lengths, backend="triton", check_lengths=False),
           lambda: ta._kvcache_fast(qd, kc, vc, lengths, 0.125), lambda: ta._kvcache(qd, kc, vc, lengths, 0.125), ())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=None, help="calls per timed run, 5 runs, median (default 20000)")
    p.add_argument("--quick", action="store_true", help="2000 calls per run")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.calls = args.calls or (2000 if args.quick else 20000)
    if ops.backend_error("triton"):
        print(f"triton backend unavailable: {ops.backend_error('triton')}", file=sys.stderr)
        return 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16  # the triton attention kernels take bf16/fp16 only
    stub_kernels()
    rows = []
    for op, public, fast, custom, differentiable in cases(device, dtype):
        for mode in ("no_grad", "grad"):
            if mode == "grad" and not differentiable:
                continue
            for t in differentiable:
                t.requires_grad_(mode == "grad")
            row = {"op": op, "mode": mode}
            for name, fn in (("dispatcher_us", custom), ("fast_path_us", fast), ("sparrow_ops_us", public)):
                row[name] = round(per_call_us(fn, args.calls), 2)
            row["saved_us"] = round(row["dispatcher_us"] - row["fast_path_us"], 2)
            rows.append(row)
            print(f"{op:24s} {mode:7s} dispatcher {row['dispatcher_us']:6.1f} us, "
                  f"fast path {row['fast_path_us']:6.1f} us, "
                  f"sparrow.ops {row['sparrow_ops_us']:6.1f} us", flush=True)
    print()
    print_table(rows, ["op", "mode", "dispatcher_us", "fast_path_us", "sparrow_ops_us", "saved_us"])
    meta = {"benchmark": "dispatch", **device_info(), "calls": args.calls,
            "method": "host time per call, Triton kernels stubbed (outputs allocated, nothing launched), native "
                      "(cuda backend) ops run at tiny shapes; median of 5 runs "
                      "of `calls` calls after warmup; dispatcher = the torch.library custom op called directly; "
                      "fast path = custom_ops.fast_path's direct call (no grad) or autograd.Function (grad); "
                      "sparrow_ops = the public sparrow.ops call with backend='triton'"}
    path = write_results("dispatch", rows, meta, out=args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
