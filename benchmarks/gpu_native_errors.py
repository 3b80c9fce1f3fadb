#!/usr/bin/env python3
"""Does a C++ exception thrown by a sparrow._C op reach Python as its ValueError?

On the H200 machine (torch 2.11, Python 3.12, g++ 13.3, 2026-12-04) every such throw killed the process with a
segmentation fault, while the CPU machines raised cleanly. This script found why: there g++ linked libstdc++
*statically* into the extension (`readelf -d` listed no libstdc++.so.6; `__cxa_throw` was defined inside it), so the
op threw with its own copy of the C++ runtime and libtorch, unwinding with the shared one, crashed. Extensions that
name the shared runtime (`-l:libstdc++.so.6`, as setup.py now does for sparrow._C) raise normally there. The probes
stay, so a new machine shows at once which case it is in. Each runs in a child process and reports the exception
it raised or the signal that ended it:

1. torch's own C++ argument check (a matmul shape mismatch): does any C++ exception reach Python there?
2. sparrow._C's rms_norm_fwd with a weight of the wrong shape (tests/test_native_ops.py's first bad call).
3. a one-op extension built here by torch.utils.cpp_extension that throws TORCH_CHECK_VALUE, linked as the
   toolchain chooses (`default_link`) and with the shared C++ runtime named (`shared_runtime`).

It also prints the compilers and the C++ runtime each library loads. Writes JSON to --out.

    python benchmarks/gpu_native_errors.py --out results/native_errors.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE_CPP = r"""
#include <torch/library.h>
#include <ATen/core/Tensor.h>

namespace {
at::Tensor throw_value(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 100, "x: expected 100 dims, got ", x.dim());
  return x;
}
}  // namespace

TORCH_LIBRARY(NAMESPACE, m) { m.def("throw_value(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(NAMESPACE, CPU, m) { m.impl("throw_value", throw_value); }
"""

BUILD = """
import sys, torch.utils.cpp_extension as ext
path = ext.load(name=sys.argv[1], sources=[sys.argv[2]], extra_cflags=["-O3"], extra_ldflags=sys.argv[3:],
                is_python_module=False, build_directory=sys.argv[2].rsplit('/', 1)[0], verbose=False)
print(path)
"""

# name -> (code, the exception it must raise)
CALLS = {
    "torch_mm_shape_error": ("import torch; torch.mm(torch.randn(2, 3), torch.randn(2, 3))", "RuntimeError"),
    "sparrow_rms_norm_bad_weight": ("import torch, sparrow._C; "
                                    "torch.ops.sparrow_C.rms_norm_fwd(torch.randn(4, 8), torch.ones(7), 1e-6)",
                                    "ValueError"),
}


def run_child(code: str, timeout: float = 300) -> dict:
    try:
        r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], cwd=ROOT, capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"outcome": "timeout"}
    tail = (r.stderr.strip().splitlines() or [""])[-1][:300]
    if r.returncode < 0:
        outcome = f"killed by signal {-r.returncode}"
    elif r.returncode == 0:
        outcome = "no exception"
    else:  # the exception's class, as the traceback's last line names it
        outcome = tail.split(":", 1)[0].rsplit(".", 1)[-1] or "unknown"
    return {"outcome": outcome, "returncode": r.returncode, "last_line": tail,
            "stderr_tail": r.stderr[-1500:] if r.returncode < 0 else None}


def tool_version(cmd: list[str], marker: str = "") -> str | None:
    """The first line of ``cmd``'s output that contains ``marker``."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return next((line for line in (out.stdout or out.stderr).splitlines() if marker in line), None)


def runtime_libs(path: str) -> list[str]:
    out = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if "stdc++" in line or "gcc_s" in line]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    import torch

    result: dict = {"torch": torch.__version__, "python": sys.version.split()[0],
                    "c++": tool_version(["c++", "--version"]), "nvcc": tool_version(["nvcc", "--version"], "release"),
                    "probes": {}}
    lib = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    result["libtorch_cpu_runtime"] = runtime_libs(str(lib))
    so = sorted((ROOT / "sparrow").glob("_C*.so"))
    result["sparrow_C_runtime"] = runtime_libs(str(so[0])) if so else None
    for name, (code, expected) in CALLS.items():
        result["probes"][name] = dict(run_child(code), expected=expected)
        print(f"{name}: {result['probes'][name]['outcome']}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="sparrow-native-errors-"))
    builds = {}
    for variant, flags in (("default_link", []), ("shared_runtime", ["-l:libstdc++.so.6"])):
        folder = work / variant
        folder.mkdir()
        source = folder / "probe.cpp"
        source.write_text(PROBE_CPP.replace("NAMESPACE", f"sparrow_probe_{variant}"))
        builds[variant] = subprocess.Popen([sys.executable, "-c", BUILD, f"sparrow_probe_{variant}", str(source), *flags],
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for variant, proc in builds.items():
        out, err = proc.communicate(timeout=600)
        key = f"probe_extension_{variant}"
        if proc.returncode != 0:
            result["probes"][key] = {"outcome": "build failed", "expected": "ValueError", "stderr_tail": err[-1500:]}
        else:
            path = out.strip().splitlines()[-1]
            code = (f"import torch; torch.ops.load_library({path!r}); "
                    f"torch.ops.sparrow_probe_{variant}.throw_value(torch.randn(2))")
            result["probes"][key] = dict(run_child(code), expected="ValueError", runtime=runtime_libs(path))
        print(f"{key}: {result['probes'][key]['outcome']}", flush=True)
    shutil.rmtree(work, ignore_errors=True)

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(v["outcome"] == v["expected"] for v in result["probes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
