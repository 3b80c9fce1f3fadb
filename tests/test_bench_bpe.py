"""bench_bpe's --premapped-heap: every worker gets the same free, already-mapped C heap before its cold pass."""

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="premap_heap sets glibc's malloc options")


def test_premapped_heap_holds_free_mapped_memory_that_new_lists_reuse():
    # In a child process: the settings are the whole process's, and pytest's must stay as they are.
    code = textwrap.dedent(f"""
        import ctypes, resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        from benchmarks.bench_bpe import premap_heap

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in
                        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = MallInfo2
        premap_heap(16)
        free = libc.mallinfo2().fordblks
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        lists = [[0] * 4096 for _ in range(256)]  # 8 MB of list slots, 32 KiB each
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        print(free, faults)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    free, faults = int(out[0]), int(out[1])
    assert free >= 16 << 20, f"only {free} bytes free after premap_heap(16)"
    # 8 MB written fresh would be ~2,000 page faults; from the premapped heap, next to none.
    assert faults < 200, f"{faults} page faults making 8 MB of lists on a premapped heap"
