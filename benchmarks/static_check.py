"""Static GPU check: compile every Sparrow kernel for sm_80 and sm_90 without a GPU and read what decides its speed.

Triton compiles for a GPU target with no GPU present (``triton.compile(ASTSource(...), target=GPUTarget(...))``);
given the 16-byte divisibility hints the JIT infers for aligned pointers and strides it emits the same code a
launch would. The ptxas run inside that compile reports registers, spill bytes and stack; the PTX shows the
async copies (``cp.async``, TMA ``cp.async.bulk``) and the tensor-core instructions (``wgmma`` on sm_90,
``mma.sync`` on sm_80); the compile metadata gives the shared memory. The CUDA kernels go through
``nvcc -Xptxas -v`` (device code only) and ``cuobjdump -sass``.

What is checked: for every Triton kernel in ``kernels/`` every config its autotuner KEEPS after its own prune
function (called here with the target arch, exactly as the autotuner calls it at run time), or the launch
parameters its wrapper derives for a grid of shapes; every supported head dim; bf16 and fp16; sm_80 and sm_90.
It fails on a compile error, a spill, shared memory over the arch's per-block limit, an attention or MoE GEMM main
loop without async (pipelined) loads at num_stages > 1, or attention/GEMM dots off the tensor cores (wgmma on
sm_90, mma.sync on sm_80).

Results are cached under ``build/static-cache`` keyed by the kernel's source hash (Triton's own cache key, which
covers the functions it calls), the Triton version and the config, so a rerun compiles only what changed.

    python -m benchmarks.static_check              # check everything, write benchmarks/results/static/*.json
    python -m benchmarks.static_check --no-write   # check only
    python -m benchmarks.static_check --kernels attention.fwd --head-dims 64 128 --dtypes bf16
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import datetime
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "static"
CACHE = ROOT / "build" / "static-cache"
ARCHS = (80, 90)
# Largest shared memory one block may opt into (CUDA programming guide, compute capability table).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = ("bf16", "fp16")
# The tensor-core instruction each arch's attention and MoE GEMM dots must use.
TC_REQUIRED = {80: "mma.sync", 90: "wgmma"}

# ------------------------------------------------------------------------------------------ ptxas / PTX parsing
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")


def parse_ptxas(log: str) -> dict[tuple[str, str], dict]:
    """``ptxas -v`` output -> {(entry, arch): {registers, stack, spill_stores, spill_loads, static_smem}}."""
    out: dict[tuple[str, str], dict] = {}
    current = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = (m.group(1), m.group(2))
            out[current] = {"registers": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0, "static_smem": 0}
            continue
        if current is None:
            continue
        m = _SPILL.search(line)
        if m:
            out[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _REGS.search(line)
        if m:
            out[current]["registers"] = int(m.group(1))
            s = _SMEM.search(line)
            if s:
                out[current]["static_smem"] = int(s.group(1))
    return out


def tensor_core_kind(code: str) -> str:
    """The tensor-core instruction family in PTX or SASS text: wgmma (Hopper warpgroup MMA), mma.sync (Ampere
    warp MMA; HMMA in SASS), both, or none."""
    wgmma = "wgmma.mma_async" in code or "HGMMA" in code
    mma = "mma.sync" in code or re.search(r"\bHMMA\b", code) is not None
    return {(True, True): "wgmma+mma.sync", (True, False): "wgmma", (False, True): "mma.sync"}.get((wgmma, mma), "none")


def async_copy_kind(ptx: str) -> str:
    if "cp.async.bulk" in ptx:
        return "tma"
    if "cp.async" in ptx:
        return "cp.async"
    return "none"


# ---------------------------------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class Job:
    """One Triton compile: a kernel function, its constexprs and launch options, for one arch and dtype."""

    kernel: str  # the name in the report, e.g. "attention.bwd_dq"
    module: str  # the module that defines it, e.g. "sparrow.kernels.attention"
    fn: str  # the @triton.jit function's name in that module
    arch: int
    dtype: str
    head_dim: int | None
    constexprs: tuple  # sorted (name, value) pairs
    num_warps: int
    num_stages: int
    pointers: tuple  # (name, element type or "" for the job dtype)
    floats: tuple = ()
    aligned: tuple = ()  # integer arguments the JIT would see as multiples of 16 (besides stride_*)
    attention_loop: bool = False  # (attention, MoE GEMM) its main loop must be pipelined and its dots on tensor cores
    tensor_cores: bool = True  # (attention_loop only) whether the dots are tensor-core dots at all
    maxnreg: int | None = None  # the config's register cap, as the autotuner passes it

    def params(self) -> str:
        shown = {k: v for k, v in self.constexprs if k.isupper() and k not in ("D", "HEAD_DIM", "IEEE")}
        return " ".join(f"{k}={v}" for k, v in shown.items()) + f" w{self.num_warps} s{self.num_stages}"

    def cache_key(self, source_key: str, toolchain: str) -> str:
        return hashlib.sha256(f"{source_key}|{toolchain}|{asdict(self)}".encode()).hexdigest()[:32]


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _attention_jobs(archs, dtypes, head_dims) -> list[Job]:
    from sparrow.kernels import attention as A

    qkv = (("Q", ""), ("K", ""), ("V", ""))
    out: list[Job] = []
    kernels = [
        # (report name, autotuned kernel, pointers, floats, {constexpr variants})
        ("attention.fwd", A._attn_fwd_tuned, "_attn_fwd_kernel",
         (*qkv, ("O", ""), ("LSE", "fp32"), ("CU_Q", "i32"), ("K_LENS", "i32")), ("qk_scale",),
         # Causal only: the non-causal specialization is the same code less the causal compare on the boundary
         # blocks (its unmasked loop is identical), and the check's CI budget buys more head dims instead.
         [dict(VARLEN=False, HAS_K_LENS=False, CAUSAL=True)]),
        ("attention.fwd_varlen", A._attn_fwd_tuned, "_attn_fwd_kernel",
         (*qkv, ("O", ""), ("LSE", "fp32"), ("CU_Q", "i32"), ("K_LENS", "i32")), ("qk_scale",),
         [dict(VARLEN=True, HAS_K_LENS=False, CAUSAL=True)]),
        ("attention.fwd_kvcache", A._attn_fwd_tuned, "_attn_fwd_kernel",
         (*qkv, ("O", ""), ("LSE", "fp32"), ("CU_Q", "i32"), ("K_LENS", "i32")), ("qk_scale",),
         [dict(VARLEN=False, HAS_K_LENS=True, CAUSAL=True)]),
        ("attention.bwd_dkdv", A._bwd_dkdv_tuned, "_attn_bwd_dkdv_kernel",
         (*qkv, ("DO", ""), ("LSE", "fp32"), ("DELTA", "fp32"), ("DK", ""), ("DV", ""), ("CU_Q", "i32")),
         ("sm_scale", "qk_scale"), [dict(VARLEN=False, CAUSAL=True), dict(VARLEN=True, CAUSAL=True)]),
        ("attention.bwd_dq", A._bwd_dq_tuned, "_attn_bwd_dq_kernel",
         (*qkv, ("DO", ""), ("LSE", "fp32"), ("DELTA", "fp32"), ("DQ", ""), ("CU_Q", "i32")),
         ("sm_scale", "qk_scale"), [dict(VARLEN=False, CAUSAL=True), dict(VARLEN=True, CAUSAL=True)]),
    ]
    for name, tuned, fn, pointers, floats, variants in kernels:
        for arch in archs:
            for d in head_dims:
                hd = max(_pow2(d), 16)
                passes = A.dkdv_passes(hd) if name == "attention.bwd_dkdv" else ((None, None),)
                for variant, (do_dk, do_dv) in ((v, p) for v in variants for p in passes):
                    launch = dict(variant, D=d, HEAD_DIM=hd)
                    if do_dk is not None:  # the dK/dV kernel's one or two passes (README "Static GPU check")
                        launch.update(DO_DK=do_dk, DO_DV=do_dv)
                    for cfg in kept_configs(tuned, launch, arch):
                        for dtype in dtypes:
                            cx = {**launch, **cfg.kwargs}
                            out.append(Job(name, "sparrow.kernels.attention", fn, arch, dtype, d,
                                           tuple(sorted(cx.items())), cfg.num_warps, cfg.num_stages, pointers,
                                           floats, attention_loop=True, maxnreg=cfg.maxnreg))
    for arch in archs:
        for d in head_dims:
            for dtype in dtypes:
                cx = dict(VARLEN=False, D=d, HEAD_DIM=max(_pow2(d), 16), BLOCK_M=A.PREPROCESS_BLOCK)
                out.append(Job("attention.bwd_preprocess", "sparrow.kernels.attention", "_bwd_preprocess_kernel",
                               arch, dtype, d, tuple(sorted(cx.items())), 4, 3,
                               (("O", ""), ("DO", ""), ("DELTA", "fp32"), ("CU_Q", "i32"))))
    return out


def kept_configs(tuned, launch: dict, arch: int) -> list:
    """The configs the autotuner keeps for these launch constexprs on ``arch``: its own ``prune_configs``."""
    tuned.nargs = {}
    try:
        return tuned.prune_configs({**launch, "arch": arch})
    finally:
        tuned.nargs = None


def _decode_jobs(archs, dtypes, head_dims) -> list[Job]:
    from sparrow.kernels import decode as Dm

    out = []
    for arch in archs:
        for d in head_dims:
            hd = max(_pow2(d), 16)
            for group in (1, 4, 8):  # the GQA group is the tile's M dimension
                lp = Dm.split_launch(d, group, interpreting=False)
                for dtype in dtypes:
                    cx = dict(D=d, HEAD_DIM=hd, BLOCK_G=lp["BLOCK_G"], BLOCK_N=lp["BLOCK_N"])
                    out.append(Job("decode.split", "sparrow.kernels.decode", "_decode_split_kernel", arch, dtype, d,
                                   tuple(sorted(cx.items())), lp["num_warps"], lp["num_stages"],
                                   (("Q", ""), ("K", ""), ("V", ""), ("LENS", "i32"), ("O_PART", "fp32"),
                                    ("LSE_PART", "fp32")), ("qk_scale",), attention_loop=True, tensor_cores=False))
            for dtype in dtypes:
                cx = dict(D=d, HEAD_DIM=hd, BLOCK_S=64)
                out.append(Job("decode.merge", "sparrow.kernels.decode", "_decode_merge_kernel", arch, dtype, d,
                               tuple(sorted(cx.items())), 4, 3, (("O_PART", "fp32"), ("LSE_PART", "fp32"),
                                                                 ("OUT", ""))))
    return out


# Hidden sizes for the norm: every power of two the one-pass path takes from 512 up, and one looped size.
NORM_HIDDEN = (512, 1024, 2048, 4096, 8192, 16384, 32768)


def _rms_norm_jobs(archs, dtypes) -> list[Job]:
    from sparrow.kernels import rms_norm as R

    out = []
    for arch in archs:
        for dtype in dtypes:
            for n in NORM_HIDDEN:
                for has_res in (False, True):
                    lp = R.fwd_launch(n, rows=1 << 16)
                    cx = dict(BLOCK_M=lp["BLOCK_M"], BLOCK=lp["BLOCK"], ONE_PASS=lp["ONE_PASS"], HAS_RES=has_res)
                    out.append(Job("rms_norm.fwd" + ("_add" if has_res else ""), "sparrow.kernels.rms_norm",
                                   "_rms_norm_fwd_kernel", arch, dtype, n, tuple(sorted(cx.items())), lp["num_warps"], 3,
                                   (("X", ""), ("R", ""), ("W", ""), ("Y", ""), ("S", ""), ("RSTD", "fp32")),
                                   ("eps",), aligned=("N",)))
                    lp = R.bwd_launch(n)
                    cx = dict(BLOCK=lp["BLOCK"], ONE_PASS=lp["ONE_PASS"], HAS_DS=has_res)
                    out.append(Job("rms_norm.bwd" + ("_add" if has_res else ""), "sparrow.kernels.rms_norm",
                                   "_rms_norm_bwd_kernel", arch, dtype, n, tuple(sorted(cx.items())), lp["num_warps"], 3,
                                   (("DY", ""), ("X", ""), ("W", ""), ("RSTD", "fp32"), ("DX", ""), ("DS", ""),
                                    ("DWP", "fp32")), aligned=("N",)))
    return out


# (query heads, kv heads) of the model shapes RoPE is checked at; head dims come from --head-dims.
ROPE_HEADS = ((8, 8), (32, 8), (16, 2))


def _rope_jobs(archs, dtypes, head_dims) -> list[Job]:
    from sparrow.kernels import rope as Rp

    out = []
    for arch in archs:
        for d in head_dims:
            for hq, hk in ROPE_HEADS:
                for backward in (False, True):
                    lp = Rp.rope_launch(hq, hk, d // 2, d, tokens=1 << 16, in_place=False)
                    for dtype in dtypes:
                        cx = dict(BACKWARD=backward, **{k: v for k, v in lp.items() if k != "num_warps"})
                        out.append(Job("rope" + ("_bwd" if backward else ""), "sparrow.kernels.rope", "_rope_kernel",
                                       arch, dtype, d, tuple(sorted(cx.items())), lp["num_warps"], 3,
                                       (("Q", ""), ("K", ""), ("COS", "fp32"), ("SIN", "fp32"), ("QO", ""),
                                        ("KO", "")),
                                       aligned=("HALF", "D")))
    return out


# (hidden, moe_intermediate) of the MoE presets in sparrow/model.py (moe-tiny, moe-500m): the grouped GEMMs run at
# N, K = (2I, H) gate/up and (H, I) down in the forward, the transposes in the input gradient.
MOE_SHAPES = ((128, 192), (768, 2048))


def _moe_jobs(archs, dtypes) -> list[Job]:
    """The grouped GEMMs of kernels/moe.py as sparrow/ops/triton_moe.py launches them: contiguous activations and
    weights, so the innermost stride of every operand is 1 (the JIT specializes a 1 to a constant); N and K are
    runtime integers, seen only by the prune. fp32 runs the IEEE (CUDA-core) dot and is not a training dtype."""
    from sparrow.kernels import moe as M

    mm_ptrs = (("A", ""), ("W", ""), ("C", ""), ("OFFSETS", "i32"))
    wg_ptrs = (("G", ""), ("A", ""), ("DW", ""), ("OFFSETS", "i32"))
    nk = [(2 * i, h) for h, i in MOE_SHAPES] + [(h, i) for h, i in MOE_SHAPES]
    nk_t = [(k, n) for n, k in nk]
    kernels = [
        # (report name, autotuned kernel, fn, pointers, unit strides, the (N, K) the prune sees)
        ("moe.grouped_mm", M._grouped_mm_tuned, "_grouped_mm_kernel", mm_ptrs,
         ("stride_ak", "stride_wk", "stride_cn"), nk),
        ("moe.grouped_mm_dgrad", M._grouped_mm_tuned, "_grouped_mm_kernel", mm_ptrs,
         ("stride_ak", "stride_wn", "stride_cn"), nk_t),
        ("moe.grouped_mm_wgrad", M._grouped_mm_wgrad_tuned, "_grouped_mm_wgrad_kernel", wg_ptrs,
         ("stride_gn", "stride_ak", "stride_dk"), nk),
    ]
    out = []
    for name, tuned, fn, pointers, unit, shapes in kernels:
        for arch in archs:
            cfgs = {}
            for n, k in shapes:
                for cfg in kept_configs(tuned, dict(N=n, K=k), arch):
                    cfgs.setdefault(str(cfg), cfg)
            for cfg in cfgs.values():
                for dtype in dtypes:
                    cx = dict(IEEE=False, **{s: 1 for s in unit}, **cfg.kwargs)
                    out.append(Job(name, "sparrow.kernels.moe", fn, arch, dtype, None, tuple(sorted(cx.items())),
                                   cfg.num_warps, cfg.num_stages, pointers, aligned=("N", "K"),
                                   attention_loop=True, maxnreg=cfg.maxnreg))
    return out


def triton_jobs(archs=ARCHS, dtypes=DTYPES, head_dims=None, kernels=None) -> list[Job]:
    from sparrow.kernels.attention import HEAD_DIMS, _interpreting

    if _interpreting():
        raise RuntimeError("the static check must run without TRITON_INTERPRET=1 (it compiles the GPU code paths)")
    head_dims = tuple(head_dims or HEAD_DIMS)
    jobs = (_attention_jobs(archs, dtypes, head_dims) + _decode_jobs(archs, dtypes, head_dims)
            + _rms_norm_jobs(archs, dtypes) + _rope_jobs(archs, dtypes, [d for d in head_dims if d % 2 == 0])
            + _moe_jobs(archs, dtypes))
    # Shapes that map to the same launch parameters compile once (a second identical compile would hit Triton's
    # in-process cache and report no ptxas run).
    jobs = list(dict.fromkeys(jobs))
    if kernels:
        jobs = [j for j in jobs if any(j.kernel == k or j.kernel.startswith(k + ".") or j.kernel.startswith(k + "_")
                                       for k in kernels)]
    return jobs


# ------------------------------------------------------------------------------------------- Triton compile
def _source(job: Job):
    import importlib

    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job.module), job.fn)
    cx = dict(job.constexprs)
    ptrs = dict(job.pointers)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in cx:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = "*" + (ptrs[name] or job.dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in job.floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith(("stride_", "s")) and "_" in name or name in job.aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return fn, ASTSource(fn, sig, cx, attrs)


def _compile_triton(job: Job) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    fn, src = _source(job)
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    t0 = time.perf_counter()
    options = dict(num_warps=job.num_warps, num_stages=job.num_stages)
    if job.maxnreg:
        options["maxnreg"] = job.maxnreg
    # A hit in Triton's own cache would skip ptxas and so its report: every compile gets an empty cache.
    saved = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="sparrow-static-") as fresh, contextlib.redirect_stdout(log):
        os.environ["TRITON_CACHE_DIR"] = fresh
        try:
            compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=options)
        finally:
            if saved is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = saved
    seconds = time.perf_counter() - t0
    stats = parse_ptxas(log.getvalue())
    if len(stats) != 1:
        raise RuntimeError(f"expected one ptxas entry, got {len(stats)}: {log.getvalue()[-2000:]}")
    (entry, stat), = stats.items()
    ptx = compiled.asm["ptx"]
    return dict(stat, smem=int(compiled.metadata.shared), async_copy=async_copy_kind(ptx),
                tensor_core=tensor_core_kind(ptx), compile_s=round(seconds, 2))


def _worker_init() -> None:
    os.environ["TRITON_INTERPRET"] = "0"


def _run_job(job: Job) -> dict:
    try:
        return _compile_triton(job)
    except Exception as exc:  # a compile error is a finding, reported with the job
        return {"error": f"{type(exc).__name__}: {str(exc)[:600]}"}


def toolchain_key() -> str:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    return f"triton-{triton.__version__}|{get_ptxas(90).version}"


def source_key(job: Job) -> str:
    import importlib

    return getattr(importlib.import_module(job.module), job.fn).cache_key


# ------------------------------------------------------------------------------------------- CUDA kernels
NVCC_FLAGS = ["-std=c++20", "-O3", "-DSPARROW_WITH_CUDA", "-lineinfo", "--expt-relaxed-constexpr",
              "--use_fast_math"]
# The CUDA attention forward runs its dots on WMMA; the CUDA backward is by design the plain fp32 CUDA-core version
# (see the header of csrc/cuda/attention_bwd.cu), so the tensor-core rule holds it to nothing.
CUDA_TENSOR_CORE_KERNELS = ("attention_fwd_kernel",)


def nvcc_path() -> Path | None:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    nvcc = Path(home, "bin", "nvcc")
    return nvcc if nvcc.exists() else None


def _demangle(names: list[str], cuda_home: Path) -> list[str]:
    filt = cuda_home / "bin" / "cu++filt"
    if not filt.exists():
        filt = shutil.which("c++filt")
        if filt is None:
            return names
    # Kernels in an anonymous namespace carry a "__nv_static_<hash>_" prefix before their mangled name.
    plain = [re.sub(r"^__nv_static_\w*?_(?=_Z)", "", n) for n in names]
    res = subprocess.run([str(filt)], input="\n".join(plain), capture_output=True, text=True)
    out = res.stdout.splitlines()
    return out if len(out) == len(names) else names


def _short_cuda_name(demangled: str) -> str:
    """'void sparrow::(anonymous namespace)::rope_kernel<c10::Half, 8>(...)' -> 'rope_kernel<Half, 8>'."""
    name = demangled.split("(")[0] if "(" in demangled and "<" not in demangled.split("(")[0] else demangled
    m = re.search(r"(\w+_kernel)(<[^()]*>)?", demangled)
    if not m:
        return name
    return (m.group(1) + (m.group(2) or "")).replace("c10::", "").replace("BFloat16", "bf16").replace("Half", "fp16")


def _cuobjdump(cuda_home: Path) -> Path:
    """The toolkit's cuobjdump, else the one bundled with Triton."""
    own = cuda_home / "bin" / "cuobjdump"
    if own.exists():
        return own
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _compile_cuda(cu: Path, archs, cache_dir: Path) -> list[dict]:
    """Device-only compile of one .cu for every arch (``--fatbin``: no host pass), ptxas stats per kernel and the
    tensor-core instructions read from its SASS."""
    nvcc = nvcc_path()
    cuda_home = nvcc.parent.parent
    import torch

    torch_inc = Path(torch.__file__).parent / "include"
    incs = [f"-I{torch_inc}", f"-I{torch_inc / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{ROOT / 'csrc'}"]
    gencode = [a for arch in archs for a in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        fatbin = Path(tmp, cu.stem + ".fatbin")
        t0 = time.perf_counter()
        res = subprocess.run([str(nvcc), *NVCC_FLAGS, *incs, *gencode, "-Xptxas", "-v", "--fatbin", "-o", str(fatbin),
                              str(cu)], capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if res.returncode != 0:
            return [{"kernel": f"cuda.{cu.stem}", "arch": None, "error": res.stderr[-1500:]}]
        stats = parse_ptxas(res.stderr)
        sass = subprocess.run([str(_cuobjdump(cuda_home)), "-sass", str(fatbin)], capture_output=True, text=True).stdout
    # SASS per function: cuobjdump prints "Function : <mangled>" then its code.
    sass_by_fn = {}
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        name, _, body = block.partition("\n")
        sass_by_fn.setdefault(name.strip(), []).append(body)
    entries = sorted(stats)
    names = _demangle([e for e, _ in entries], cuda_home)
    rows = []
    for (entry, arch_s), demangled in zip(entries, names):
        arch = int(re.sub(r"\D", "", arch_s))
        bodies = sass_by_fn.get(entry, [])
        # cuobjdump lists the arch of each section; the bodies come in the same order as the gencodes.
        body = bodies[list(archs).index(arch)] if len(bodies) == len(archs) else "".join(bodies)
        short = _short_cuda_name(demangled)
        rows.append(dict(stats[(entry, arch_s)], kernel=f"cuda.{cu.stem}", arch=arch, params=short,
                         smem=stats[(entry, arch_s)]["static_smem"], tensor_core=tensor_core_kind(body),
                         async_copy="cp.async" if "LDGSTS" in body else ("tma" if "UTMALDG" in body else "none"),
                         needs_tensor_cores=any(k in short for k in CUDA_TENSOR_CORE_KERNELS),
                         compile_s=round(seconds / max(len(entries), 1), 2)))
    return rows


def cuda_sources() -> list[Path]:
    return sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def _cuda_key(cu: Path, archs) -> str:
    h = hashlib.sha256()
    for p in sorted((ROOT / "csrc").glob("*.h")) + sorted((ROOT / "csrc" / "cuda").glob("*.cuh")) + [cu]:
        h.update(p.read_bytes())
    nvcc = nvcc_path()
    version = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout
    import torch

    h.update(f"{version}|{torch.__version__}|{NVCC_FLAGS}|{list(archs)}".encode())
    return h.hexdigest()[:32]


def _run_cuda(cu_and_archs) -> list[dict]:
    cu, archs, cache_dir = cu_and_archs
    try:
        return _compile_cuda(Path(cu), archs, Path(cache_dir))
    except Exception as exc:
        return [{"kernel": f"cuda.{Path(cu).stem}", "arch": None, "error": f"{type(exc).__name__}: {exc}"}]


# --------------------------------------------------------------------------------------------------- rules
def problems(rec: dict) -> list[str]:
    """Why a compiled kernel fails the check (empty when it passes)."""
    if rec.get("error"):
        return ["compile error"]
    found = []
    if rec["spill_stores"] or rec["spill_loads"]:
        found.append(f"spills {rec['spill_stores']} B stores / {rec['spill_loads']} B loads")
    if rec["smem"] > SMEM_LIMIT[rec["arch"]]:
        found.append(f"shared memory {rec['smem']} B > {SMEM_LIMIT[rec['arch']]} B")
    if rec.get("attention_loop"):
        if rec["num_stages"] > 1 and rec["async_copy"] == "none":
            found.append("main loop loads not pipelined (no async copy)")
    if rec.get("needs_tensor_cores"):
        want = TC_REQUIRED[rec["arch"]] if rec["kernel"].startswith(("attention.", "moe.")) else None
        if rec["tensor_core"] == "none":
            found.append("dots off the tensor cores")
        elif want and rec["tensor_core"] != want:
            found.append(f"dots on {rec['tensor_core']}, not {want}")
    return found


def _record(job: Job, result: dict) -> dict:
    rec = dict(kernel=job.kernel, arch=job.arch, dtype=job.dtype, head_dim=job.head_dim, params=job.params(),
               num_warps=job.num_warps, num_stages=job.num_stages, attention_loop=job.attention_loop,
               needs_tensor_cores=job.attention_loop and job.tensor_cores, **result)
    rec["problems"] = problems(rec)
    return rec


# ------------------------------------------------------------------------------------------------- driver
def run(jobs: list[Job], *, workers: int = 2, cuda: bool = True, archs=ARCHS, use_cache: bool = True,
        progress=None) -> list[dict]:
    CACHE.mkdir(parents=True, exist_ok=True)
    toolchain = toolchain_key()
    records: list[dict | None] = [None] * len(jobs)
    todo = []
    for i, job in enumerate(jobs):
        path = CACHE / f"{job.cache_key(source_key(job), toolchain)}.json"
        if use_cache and path.exists():
            records[i] = _record(job, json.loads(path.read_text()))
        else:
            todo.append((i, path))
    cuda_todo, cuda_rows = [], []
    if cuda and nvcc_path() is not None:
        for cu in cuda_sources():
            path = CACHE / f"cuda-{cu.stem}-{_cuda_key(cu, archs)}.json"
            if use_cache and path.exists():
                cuda_rows += json.loads(path.read_text())
            else:
                cuda_todo.append((cu, path))
    scratch = tempfile.mkdtemp(prefix="triton-", dir=CACHE)
    try:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
            # CUDA files first (each is one long nvcc), then the Triton jobs, slowest kernels first.
            cuda_futs = {pool.submit(_run_cuda, (str(cu), tuple(archs), scratch)): (cu, path) for cu, path in cuda_todo}
            order = sorted(todo, key=lambda ip: not jobs[ip[0]].attention_loop)
            futs = {pool.submit(_run_job, jobs[i]): (i, path) for i, path in order}
            done = 0
            for fut in cf.as_completed(list(futs) + list(cuda_futs)):
                if fut in cuda_futs:
                    cu, path = cuda_futs[fut]
                    rows = fut.result()
                    if not any(r.get("error") for r in rows):
                        path.write_text(json.dumps(rows))
                    cuda_rows += rows
                    continue
                i, path = futs[fut]
                result = fut.result()
                if "error" not in result:
                    path.write_text(json.dumps(result))
                records[i] = _record(jobs[i], result)
                done += 1
                if progress:
                    progress(done, len(todo))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for row in cuda_rows:
        row["needs_tensor_cores"] = any(k in row.get("params", "") for k in CUDA_TENSOR_CORE_KERNELS)
        row.setdefault("dtype", None)
        row.setdefault("head_dim", None)
        row.setdefault("num_warps", None)
        row.setdefault("num_stages", None)
        row["problems"] = problems(row) if row.get("arch") else ["compile error"]
    return [r for r in records if r is not None] + cuda_rows


def summarize(records: list[dict]) -> list[dict]:
    """One row per (kernel, arch): configs checked, clean, worst registers/spills, max smem, async, tensor cores."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["kernel"], r.get("arch")), []).append(r)
    rows = []
    for (kernel, arch), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        ok = [r for r in rs if not r.get("error")]
        rows.append(dict(
            kernel=kernel, arch=f"sm_{arch}" if arch else "?", checked=len(rs),
            clean=sum(not r["problems"] for r in rs),
            max_registers=max((r["registers"] for r in ok), default=None),
            max_spill=max((r["spill_stores"] for r in ok), default=None),
            max_smem_kb=round(max((r["smem"] for r in ok), default=0) / 1024, 1),
            async_copy="/".join(sorted({r["async_copy"] for r in ok})),
            tensor_core="/".join(sorted({r["tensor_core"] for r in ok})),
        ))
    return rows


def format_table(rows: list[dict]) -> str:
    head = "| kernel | arch | checked | clean | max regs | max spill B | max smem KB | async copy | tensor cores |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['checked']} | {r['clean']} | {r['max_registers']} | "
                     f"{r['max_spill']} | {r['max_smem_kb']} | {r['async_copy']} | {r['tensor_core']} |")
    return "\n".join(lines)


def versions() -> dict:
    import torch
    import triton

    from benchmarks.common import _git_commit

    nvcc = nvcc_path()
    cuda = None
    if nvcc:
        m = re.search(r"release ([\d.]+)", subprocess.run([str(nvcc), "--version"], capture_output=True,
                                                          text=True).stdout)
        cuda = m.group(1) if m else None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": _git_commit(), "triton": triton.__version__, "ptxas": toolchain_key().split("|")[1],
            "nvcc": cuda, "torch": torch.__version__, "python": sys.version.split()[0]}


def write_results(records: list[dict], archs=ARCHS) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = versions()
    keep = ("kernel", "arch", "dtype", "head_dim", "params", "num_warps", "num_stages", "registers", "spill_stores",
            "spill_loads", "stack", "smem", "async_copy", "tensor_core", "problems", "error")
    for arch in archs:
        rs = [{k: r[k] for k in keep if k in r} for r in records if r.get("arch") == arch]
        summary = [s for s in summarize(records) if s["arch"] == f"sm_{arch}"]
        head = {"meta": dict(meta, arch=f"sm_{arch}", smem_limit=SMEM_LIMIT[arch]), "summary": summary}
        # One record a line: a thousand rows stay readable and diff line by line.
        text = json.dumps(head, indent=1)[:-2] + ',\n "rows": [\n' + ",\n".join(json.dumps(r) for r in rs) + "\n ]\n}\n"
        (RESULTS / f"sm_{arch}.json").write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", type=int, nargs="+", default=list(ARCHS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES))
    p.add_argument("--head-dims", type=int, nargs="+", default=None)
    p.add_argument("--kernels", nargs="+", default=None, help="kernel name prefixes, e.g. attention.fwd rope")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/static/*.json")
    p.add_argument("--list", action="store_true", help="print the jobs and exit")
    p.add_argument("--verbose", action="store_true", help="print every failing record")
    p.add_argument("--dump", help="also write every record to this JSON file")
    args = p.parse_args(argv)
    # The interpreter swaps in CPU-only code paths and configs: the check compiles what a GPU runs. Set before the
    # kernels are imported; the spawned workers set it too.
    os.environ["TRITON_INTERPRET"] = "0"
    t0 = time.perf_counter()
    jobs = triton_jobs(args.archs, args.dtypes, args.head_dims, args.kernels)
    if args.list:
        for j in jobs:
            print(f"{j.kernel:24s} sm_{j.arch} {j.dtype} hd{j.head_dim} {j.params()}")
        print(f"{len(jobs)} Triton jobs")
        return 0
    cuda = not args.no_cuda and not args.kernels
    if cuda and nvcc_path() is None:
        print("static_check: nvcc not found, CUDA kernels not checked")
    print(f"static_check: {len(jobs)} Triton compiles{' + CUDA kernels' if cuda else ''}, {args.workers} workers",
          flush=True)

    def progress(done, total):
        if done % 50 == 0 or done == total:
            print(f"  {done}/{total} compiled ({time.perf_counter() - t0:.0f} s)", flush=True)

    records = run(jobs, workers=args.workers, cuda=cuda, archs=args.archs, use_cache=not args.no_cache,
                  progress=progress)
    print(format_table(summarize(records)))
    if args.dump:
        Path(args.dump).write_text(json.dumps(records, indent=1))
    bad = [r for r in records if r["problems"]]
    for r in bad if args.verbose else bad[:40]:
        print(f"FAIL {r['kernel']} sm_{r.get('arch')} {r.get('dtype')} hd{r.get('head_dim')} {r.get('params')}: "
              f"{'; '.join(r['problems'])} {r.get('error', '')[:300] if r.get('error') else ''}")
    if not args.no_write and not args.kernels and args.head_dims is None:
        write_results(records, args.archs)
    print(f"static_check: {len(records) - len(bad)}/{len(records)} clean in {time.perf_counter() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
