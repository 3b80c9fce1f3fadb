"""The static GPU check's logic: ptxas/PTX parsing, the failure rules, a deliberately spilling kernel flagged, and
the kept-config enumeration equal to what the autotuners keep at run time.

Compiling for a GPU target needs no GPU, but it needs Triton without the interpreter, which conftest turns on for
the CPU tests: those parts run in a subprocess with ``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks import static_check as sc

ROOT = Path(__file__).resolve().parent.parent

PTXAS_LOG = """\
ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_attn_bwd_dkdv_kernel' for 'sm_80'
ptxas info    : Function properties for _attn_bwd_dkdv_kernel
    20480 bytes stack frame, 20736 bytes spill stores, 20672 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 504 bytes cmem[0]
ptxas info    : Compiling entry function '_Z11rope_kernelPf' for 'sm_90'
ptxas info    : Function properties for _Z11rope_kernelPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 46 registers, used 0 barriers, 2048 bytes smem, 544 bytes cmem[0]
"""


def _subprocess_env(extra_path: Path | None = None) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path or ""), str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def test_parse_ptxas_reads_every_entry():
    stats = sc.parse_ptxas(PTXAS_LOG)
    assert stats[("_attn_bwd_dkdv_kernel", "sm_80")] == dict(registers=255, stack=20480, spill_stores=20736,
                                                              spill_loads=20672, static_smem=0)
    assert stats[("_Z11rope_kernelPf", "sm_90")] == dict(registers=46, stack=0, spill_stores=0, spill_loads=0,
                                                          static_smem=2048)


def test_instruction_kinds():
    assert sc.tensor_core_kind("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16") == "wgmma"
    assert sc.tensor_core_kind("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == "mma.sync"
    assert sc.tensor_core_kind("  HMMA.16816.F32.BF16 R4, R8, R12, R4 ;") == "mma.sync"
    assert sc.tensor_core_kind("fma.rn.f32") == "none"
    assert sc.async_copy_kind("cp.async.cg.shared.global [%r1], [%rd2], 16;") == "cp.async"
    assert sc.async_copy_kind("cp.async.bulk.tensor.2d.shared::cluster.global") == "tma"
    assert sc.async_copy_kind("ld.global.v4.b32") == "none"


def _rec(**kw):
    rec = dict(kernel="attention.fwd", arch=90, registers=128, spill_stores=0, spill_loads=0, smem=64 * 1024,
               num_stages=3, async_copy="cp.async", tensor_core="wgmma", attention_loop=True, needs_tensor_cores=True)
    rec.update(kw)
    return rec


def test_rules():
    assert sc.problems(_rec()) == []
    assert sc.problems(_rec(spill_stores=8, spill_loads=8)) == ["spills 8 B stores / 8 B loads"]
    assert sc.problems(_rec(smem=228 * 1024))[0].startswith("shared memory")
    assert sc.problems(_rec(smem=200 * 1024, arch=80, tensor_core="mma.sync"))[0].startswith("shared memory")
    assert sc.problems(_rec(async_copy="none")) == ["main loop loads not pipelined (no async copy)"]
    assert sc.problems(_rec(async_copy="none", num_stages=1)) == []
    assert sc.problems(_rec(tensor_core="mma.sync")) == ["dots on mma.sync, not wgmma"]
    assert sc.problems(_rec(tensor_core="none", arch=80)) == ["dots off the tensor cores"]
    assert sc.problems(_rec(arch=80, tensor_core="mma.sync")) == []
    assert sc.problems({"error": "PTXASError"}) == ["compile error"]


SPILLER = '''
import triton
import triton.language as tl


@triton.jit
def big_tile(X, Y, stride_x, BLOCK: tl.constexpr):
    # A BLOCK x BLOCK fp32 tile held whole by one warp (both reductions need all of it): 32 values a thread at
    # BLOCK=32, 512 at BLOCK=128, twice the register file.
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs[:, None] * stride_x + offs[None, :])
    y = x * tl.sum(x, 0)[None, :] + tl.max(x, 1)[:, None]
    tl.store(Y + offs[:, None] * stride_x + offs[None, :], y)
'''


def test_spilling_config_is_flagged(tmp_path):
    (tmp_path / "spiller.py").write_text(SPILLER)
    script = textwrap.dedent("""
        import json
        from benchmarks import static_check as sc
        out = {}
        for block in (32, 128):
            job = sc.Job("spiller", "spiller", "big_tile", 80, "fp32", None, (("BLOCK", block),), 1, 1,
                         (("X", ""), ("Y", "")))
            out[block] = sc._record(job, sc._run_job(job))
        print(json.dumps(out))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_subprocess_env(tmp_path),
                         cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    small, big = out["32"], out["128"]
    assert small["problems"] == [] and small["registers"] > 0
    assert big["spill_stores"] > 0 and any(p.startswith("spills") for p in big["problems"])


def test_kept_configs_equal_the_autotuners_own_pruning():
    """At run time the prune functions read the arch from torch.cuda; the check passes it explicitly. Both must keep
    the same configs, for every tuned attention kernel, arch and head dim."""
    script = textwrap.dedent("""
        import json, torch
        from benchmarks import static_check as sc
        from sparrow.kernels import attention as A
        out = []
        for arch in sc.ARCHS:
            torch.cuda.is_available = lambda: True
            torch.cuda.get_device_capability = lambda device=None, a=arch: divmod(a, 10)
            for tuned in (A._attn_fwd_tuned, A._bwd_dkdv_tuned, A._bwd_dq_tuned):
                for d in A.HEAD_DIMS:
                    launch = dict(VARLEN=False, CAUSAL=True, D=d, HEAD_DIM=max(sc._pow2(d), 16))
                    tuned.nargs = {}
                    at_run_time = tuned.prune_configs(dict(launch))
                    checked = sc.kept_configs(tuned, launch, arch)
                    out.append([arch, d, len(tuned.configs), [str(c) for c in at_run_time], [str(c) for c in checked],
                                [c.kwargs["BLOCK_M"] for c in checked], [c.kwargs["BLOCK_N"] for c in checked]])
        print(json.dumps(out))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_subprocess_env(),
                         cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(rows) == len(sc.ARCHS) * 3 * 6
    for arch, d, total, at_run_time, checked, _, _ in rows:
        assert checked == at_run_time and 0 < len(checked) <= total, (arch, d)
    # Hopper's wgmma takes 64-row tiles: every kept tile's M dimension is at least 64 there.
    for tuned_index, (arch, d, _, _, _, bms, bns) in enumerate(rows):
        kind = tuned_index // 6 % 3  # fwd, dkdv, dq
        if arch >= 90:
            rows_of_dots = bns if kind == 1 else bms
            assert min(rows_of_dots) >= 64, (arch, d, kind)


@pytest.mark.parametrize("arch", sc.ARCHS)
def test_committed_results_are_clean(arch):
    """The committed results say every kept config passed, and name the toolchain that compiled them."""
    path = sc.RESULTS / f"sm_{arch}.json"
    data = json.loads(path.read_text())
    assert data["meta"]["triton"] and data["meta"]["commit"]
    assert data["rows"] and all(not r["problems"] for r in data["rows"])
    kernels = {r["kernel"] for r in data["rows"]}
    assert {"attention.fwd", "attention.bwd_dkdv", "attention.bwd_dq", "attention.fwd_varlen", "decode.split",
            "rms_norm.fwd", "rms_norm.bwd", "rope", "moe.grouped_mm", "moe.grouped_mm_dgrad",
            "moe.grouped_mm_wgrad"} <= kernels


def test_split_dkdv_passes_match_one_pass(monkeypatch):
    """The check found no spill-free one-pass dK/dV tile at head dim 256, so there dK and dV take a pass each. Both
    forms give the same gradients; forced on a small head dim here, under the interpreter."""
    import torch

    from sparrow.kernels import attention as A

    torch.manual_seed(0)
    q = torch.randn(1, 33, 4, 16, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 33, 2, 16, dtype=torch.bfloat16) for _ in range(2))
    do = torch.randn_like(q)
    out, lse = A.attention_fwd(q, k, v, True, 0.25)
    one_pass = A.attention_bwd(do, q, k, v, out, lse, True, 0.25)
    assert A.dkdv_passes(16) == ((True, True),)
    monkeypatch.setattr(A, "SPLIT_DKDV_HEAD_DIM", 16)
    assert A.dkdv_passes(16) == ((True, False), (False, True))
    two_passes = A.attention_bwd(do, q, k, v, out, lse, True, 0.25)
    for a, b in zip(one_pass, two_passes):
        assert torch.equal(a, b)
