"""Builds Sparrow's two native extensions with ninja.

* ``sparrow._bpe``: the C++ BPE core (pybind11). Needs only a C++17 compiler, so it is built everywhere.
* ``sparrow._C``: CUDA kernels registered with ``TORCH_LIBRARY`` (csrc/torch_bindings.cpp). Built when
  nvcc and a CUDA build of torch are present; ``SPARROW_CUDA=0`` forces it off, ``SPARROW_CUDA=1`` forces
  it on and fails loudly when it cannot be built.

The BPE core's source list lives in csrc/bpe/sources.txt and is shared with CMakeLists.txt, so the wheel
and the ctest build compile the same files.
"""

import glob
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()

# torch looks for the CUDA toolkit under /usr/local when CUDA_HOME is unset and then fails to link
# libcudart; the toolkit on our machines lives in /usr/local/cuda.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402  (after CUDA_HOME is set: cpp_extension reads it at import)
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension  # noqa: E402
from setuptools import Extension  # noqa: E402


def read_source_list(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def pybind11_include() -> str:
    import pybind11

    return pybind11.get_include()


# -g0: Python's own CFLAGS add -g, which makes the BPE module 8 MB for nothing.
CXX_FLAGS = ["-O3", "-g0", "-std=c++17", "-fvisibility=hidden"]

bpe_extension = Extension(
    name="sparrow._bpe",
    sources=["csrc/bpe_bindings.cpp", *read_source_list(ROOT / "csrc/bpe/sources.txt")],
    include_dirs=[str(ROOT / "csrc"), pybind11_include()],
    language="c++",
    extra_compile_args=CXX_FLAGS,
)


def cuda_extension_wanted() -> bool:
    mode = os.environ.get("SPARROW_CUDA", "auto").strip().lower()
    if mode not in {"0", "1", "auto", ""}:
        sys.exit(f"SPARROW_CUDA must be 0, 1 or unset, got {mode!r}")
    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is not a CUDA build")
    if CUDA_HOME is None or not Path(CUDA_HOME, "bin", "nvcc").exists():
        missing.append("nvcc not found (set CUDA_HOME)")
    if mode == "0":
        print("sparrow: SPARROW_CUDA=0, skipping sparrow._C (CUDA kernels)", file=sys.stderr)
        return False
    if missing:
        if mode == "1":
            sys.exit("sparrow: SPARROW_CUDA=1 but sparrow._C cannot be built: " + "; ".join(missing))
        print("sparrow: skipping sparrow._C (CUDA kernels): " + "; ".join(missing), file=sys.stderr)
        return False
    return True


# sparrow._C throws c10 exceptions that libtorch catches and turns into Python errors; both sides must share one
# C++ runtime. Where the toolchain's libstdc++.so link is missing (the H200 machine, g++ 13.3), g++ silently links
# libstdc++.a into the extension and every TORCH_CHECK that fires kills the process. Naming the shared library
# itself makes that link always dynamic.
SHARED_CXX_RUNTIME = ["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else []

ext_modules = [bpe_extension]
if cuda_extension_wanted():
    ext_modules.append(
        CUDAExtension(
            name="sparrow._C",
            sources=sorted(
                ["csrc/torch_bindings.cpp", *glob.glob("csrc/cpu/*.cpp"), *glob.glob("csrc/cuda/*.cu")]
            ),
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args={
                # No -std here: torch's headers pick the standard they need (C++20 from torch 2.10 on).
                "cxx": ["-O3", "-fvisibility=hidden", "-DSPARROW_WITH_CUDA"],
                "nvcc": ["-O3", "-DSPARROW_WITH_CUDA", "-lineinfo", "--expt-relaxed-constexpr", "--use_fast_math"],
            },
            extra_link_args=SHARED_CXX_RUNTIME,
        )
    )

setup(
    # kernels/ sits at the top level beside csrc/ (sources by language) but installs as sparrow.kernels.
    packages=find_packages(include=["sparrow", "sparrow.*"]) + ["sparrow.kernels"],
    package_dir={"sparrow.kernels": "kernels"},
    package_data={"sparrow": ["py.typed"], "sparrow.serving": ["static/*"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
