"""Performance model: how long each Sparrow kernel should take at the H100 SXM / H200 peaks, before a GPU says.

For each kernel and shape: the FLOPs it executes, the bytes it must move through HBM at least (every input read
once, every output written once), the arithmetic intensity (FLOP/byte) and the roofline time
``max(FLOPs / peak FLOP/s, bytes / peak bandwidth)``. Beside it, the occupancy its compiled code allows on
sm_90 (resident warps per SM from its registers and shared memory, read from the static check's
``benchmarks/results/static/sm_90.json``): a kernel far from its roofline time with low occupancy is the first
place to look. It is a model: a lower bound the kernel can approach, not a measurement; the benchmark scripts
print it beside their measured times on a GPU (``benchmarks.common.model_ms``).

    python -m benchmarks.perf_model               # the table
    python -m benchmarks.perf_model --markdown    # as in the README
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

STATIC = Path(__file__).resolve().parent / "results" / "static"


@dataclass(frozen=True)
class Peak:
    hbm_gbs: float  # HBM bandwidth, GB/s
    tflops: float  # dense bf16/fp16 tensor-core TFLOP/s


PEAKS = {"H100 SXM": Peak(3350.0, 989.0), "H200": Peak(4800.0, 989.0)}


def peak_for(device_name: str | None) -> Peak | None:
    """The peaks of a torch device name, or None for a device the model does not know."""
    name = (device_name or "").lower()
    if "h200" in name:
        return PEAKS["H200"]
    if "h100" in name and "pcie" not in name and "nvl" not in name:
        return PEAKS["H100 SXM"]
    return None


# Per-SM resources of sm_90 (H100/H200) and sm_80 (A100).
SM = {90: dict(regs=65536, smem=228 * 1024, warps=64, blocks=32),
      80: dict(regs=65536, smem=164 * 1024, warps=64, blocks=32)}


def occupancy(registers: int, num_warps: int, smem: int, arch: int = 90) -> dict:
    """Resident blocks and warps per SM: registers are allocated per warp in units of 256, each block reserves
    1 KB of shared memory for the system."""
    sm = SM[arch]
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = sm["regs"] // (regs_per_warp * num_warps)
    by_smem = sm["smem"] // (smem + 1024) if smem else sm["blocks"]
    blocks = min(by_regs, by_smem, sm["warps"] // num_warps, sm["blocks"])
    return dict(blocks=blocks, warps=blocks * num_warps, fraction=blocks * num_warps / sm["warps"])


# ------------------------------------------------------------------------------------------- workloads
def attention_fwd(batch, seq, heads, kv_heads, head_dim, causal=True, elem=2) -> tuple[float, float]:
    """(FLOPs, bytes): QK^T and PV, halved when causal; q, k, v read and o, lse written once."""
    flops = 4.0 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
    moved = (2 * batch * seq * (heads + kv_heads) * head_dim) * elem + 4 * batch * heads * seq
    return flops, moved


def attention_bwd(batch, seq, heads, kv_heads, head_dim, causal=True, elem=2) -> tuple[float, float]:
    """(FLOPs, bytes) of the split backward as executed: dK/dV recomputes QK^T and does dP^T, dV, dK (4 matmuls),
    dQ recomputes QK^T and dP and does dQ (3): 7 matmuls, 3.5x the forward (flash-attention counts 2.5x).
    Reads q, k, v, o, dO, lse; writes dq, dk, dv, delta."""
    flops = 3.5 * attention_fwd(batch, seq, heads, kv_heads, head_dim, causal, elem)[0]
    moved = (4 * batch * seq * (heads + kv_heads) * head_dim) * elem + 12 * batch * heads * seq
    return flops, moved


def decode(batch, cache_len, heads, kv_heads, head_dim, elem=2) -> tuple[float, float]:
    """One new token against a KV cache: the cache is read once."""
    flops = 4.0 * batch * heads * cache_len * head_dim
    return flops, 2.0 * batch * cache_len * kv_heads * head_dim * elem + 2 * batch * heads * head_dim * elem


def rms_norm_fwd(tokens, hidden, fused_add=False, elem=2) -> tuple[float, float]:
    """x (and the residual) read, y (and the sum) written; ~4 FLOPs an element."""
    return 4.0 * tokens * hidden, (4 if fused_add else 2) * tokens * hidden * elem + hidden * elem + 4 * tokens


def rms_norm_bwd(tokens, hidden, fused_add=False, elem=2) -> tuple[float, float]:
    """dy and x (and the residual gradient) read, dx written; ~8 FLOPs an element."""
    return 8.0 * tokens * hidden, (4 if fused_add else 3) * tokens * hidden * elem + hidden * elem + 4 * tokens


def rope(tokens, heads, kv_heads, head_dim, elem=2) -> tuple[float, float]:
    """q and k read and written, cos/sin read once per token; 3 FLOPs an element."""
    qk = tokens * (heads + kv_heads) * head_dim
    return 3.0 * qk, 2 * qk * elem + tokens * head_dim * elem


WORKLOADS = {"attention.fwd": attention_fwd, "attention.bwd": attention_bwd, "decode": decode,
             "rms_norm.fwd": rms_norm_fwd, "rms_norm.bwd": rms_norm_bwd, "rope": rope}


def roofline_ms(flops: float, moved: float, peak: Peak) -> float:
    return max(flops / (peak.tflops * 1e12), moved / (peak.hbm_gbs * 1e9)) * 1e3


def predict_ms(kernel: str, device_name: str | None, **shape) -> float | None:
    """The model's time for ``kernel`` (a WORKLOADS name) at ``shape`` on the named device; None when the device's
    peaks are unknown."""
    peak = peak_for(device_name)
    if peak is None:
        return None
    return roofline_ms(*WORKLOADS[kernel](**shape), peak)


# ------------------------------------------------------------------------------------- static occupancy
# Which static-check kernels a workload runs (its occupancy is the lowest of them).
STATIC_KERNELS = {"attention.fwd": ("attention.fwd",), "attention.bwd": ("attention.bwd_dkdv", "attention.bwd_dq"),
                  "decode": ("decode.split",), "rms_norm.fwd": ("rms_norm.fwd",), "rms_norm.bwd": ("rms_norm.bwd",),
                  "rope": ("rope",)}


def static_occupancy(kernel: str, head_dim: int | None, arch: int = 90, path: Path | None = None) -> float | None:
    """Best occupancy (resident warps / 64) over the clean kept configs of ``kernel`` at ``head_dim`` (bf16),
    from the committed static-check results; None when they are not there."""
    path = path or STATIC / f"sm_{arch}.json"
    if not path.exists():
        return None
    rows = json.loads(path.read_text())["rows"]
    fractions = []
    for name in STATIC_KERNELS[kernel]:
        best = None
        for r in rows:
            if r["kernel"] != name or r.get("dtype") != "bf16" or r.get("error") or r.get("problems"):
                continue
            if head_dim is not None and r.get("head_dim") != head_dim:  # the hidden size for RMSNorm
                continue
            occ = occupancy(r["registers"], r["num_warps"], r["smem"], arch)["fraction"]
            best = occ if best is None else max(best, occ)
        if best is None:
            return None
        fractions.append(best)
    return min(fractions)


# -------------------------------------------------------------------------------------------- the table
def grid() -> list[tuple[str, dict, int | None]]:
    """(kernel, shape, head dim for the occupancy look-up): Llama-like shapes, 16k tokens a batch."""
    rows = []
    for d in (64, 128):
        heads = 2048 // d
        for seq in (1024, 4096, 16384):
            for k in ("attention.fwd", "attention.bwd"):
                rows.append((k, dict(batch=16384 // seq, seq=seq, heads=heads, kv_heads=heads, head_dim=d), d))
    rows.append(("decode", dict(batch=8, cache_len=8192, heads=32, kv_heads=8, head_dim=128), 128))
    for hidden in (2048, 4096, 8192):
        rows.append(("rms_norm.fwd", dict(tokens=16384, hidden=hidden), hidden))
        rows.append(("rms_norm.bwd", dict(tokens=16384, hidden=hidden), hidden))
    rows.append(("rope", dict(tokens=16384, heads=32, kv_heads=8, head_dim=128), 128))
    return rows


def table() -> list[dict]:
    out = []
    for kernel, shape, d in grid():
        flops, moved = WORKLOADS[kernel](**shape)
        occ = static_occupancy(kernel, d)
        out.append(dict(kernel=kernel, shape=" ".join(f"{k}={v}" for k, v in shape.items()), gflop=flops / 1e9,
                        mb=moved / 1e6, intensity=flops / moved, occupancy=occ,
                        h100_ms=roofline_ms(flops, moved, PEAKS["H100 SXM"]),
                        h200_ms=roofline_ms(flops, moved, PEAKS["H200"]),
                        bound="compute" if flops / moved > PEAKS["H100 SXM"].tflops * 1e3 / PEAKS["H100 SXM"].hbm_gbs
                        else "memory"))
    return out


def format_markdown(rows: list[dict]) -> str:
    lines = ["| kernel | shape | GFLOP | MB moved | FLOP/B | bound (H100) | sm_90 occupancy | H100 SXM ms | H200 ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        occ = f"{r['occupancy']:.0%}" if r["occupancy"] is not None else "-"
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['gflop']:.1f} | {r['mb']:.1f} | {r['intensity']:.1f} | "
                     f"{r['bound']} | {occ} | {r['h100_ms']:.3f} | {r['h200_ms']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    rows = table()
    if args.markdown:
        print(format_markdown(rows))
    else:
        from benchmarks.common import print_table

        print_table(rows, ["kernel", "shape", "gflop", "mb", "intensity", "bound", "occupancy", "h100_ms", "h200_ms"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
