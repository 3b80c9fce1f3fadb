"""Helpers shared by the GPU kernel benchmarks: timing, device and environment facts, JSON results, tables.

Result files follow the format ``python -m benchmarks`` plots: ``{"meta": {...}, "rows": [...], "plot": {...}}``
under ``benchmarks/results/<device-slug>/<name>.json``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# Peak HBM bandwidth in GB/s (vendor spec sheets), matched against torch.cuda.get_device_name() in order.
_PEAK_BANDWIDTH_GBS: list[tuple[str, float]] = [
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5 (HBM3)
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40GB
]


def peak_bandwidth_gbs(device_name: str) -> float | None:
    for key, gbs in _PEAK_BANDWIDTH_GBS:
        if key.lower() in device_name.lower():
            return gbs
    return None


def device_slug(name: str | None = None) -> str:
    """The results folder name for this machine's device: same rule as ``python -m benchmarks``."""
    if name is None:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu-{platform.machine()}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower()


def _git_commit() -> str | None:
    # A lent GPU machine gets the working tree without its .git: the run names the commit it was sent from.
    if os.environ.get("SPARROW_COMMIT"):
        return os.environ["SPARROW_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True, timeout=10).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def device_info() -> dict:
    """Device, peak bandwidth and software versions: the metadata every result file carries."""
    info: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(
            device=props.name,
            sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            driver=_driver_version(),
            peak_bandwidth_gbs=peak_bandwidth_gbs(props.name),
        )
    else:
        info.update(device=f"cpu-{platform.machine()}", peak_bandwidth_gbs=None)
    return info


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def model_ms(kernel: str, **shape) -> float | None:
    """The performance model's time (``benchmarks/perf_model.py``: roofline at this GPU's peaks) for ``kernel`` at
    ``shape``, printed beside the measured time so a first GPU run shows which kernel misses its model and by how
    much; None off a GPU the model knows (H100 SXM, H200)."""
    from benchmarks.perf_model import predict_ms

    return predict_ms(kernel, torch.cuda.get_device_name() if torch.cuda.is_available() else None, **shape)


def time_fn(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn()``. ``warmup`` and ``rep`` are time budgets in ms, as in
    ``triton.testing.do_bench`` (which is used on the GPU: CUDA events, L2 flushed between calls)."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()  # first call: compilation, allocation
    times = []
    deadline = time.perf_counter() + rep / 1000
    while not times or (time.perf_counter() < deadline and len(times) < 1000):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return times[len(times) // 2]


def host_ms(fn: Callable[[], object], calls: int = 200) -> float | None:
    """Host time of one call of ``fn`` on a GPU (median of batches; the kernels queue up and run meanwhile):
    when it is near the measured time, the op is bound by its Python/dispatch overhead, not by the kernel
    (the H200 run's RMSNorm at hidden 2048). None off a GPU, where host time is all there is."""
    if not torch.cuda.is_available():
        return None
    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        batches = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(calls // 5):
                fn()
            batches.append((time.perf_counter() - start) * 1000 / (calls // 5))
            torch.cuda.synchronize()
    return sorted(batches)[len(batches) // 2]


def peak_memory_mib(fn: Callable[[], object]) -> float | None:
    """Memory ``fn()`` allocates beyond what is already live, at its peak (GPU only)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bandwidth(bytes_moved: float, ms: float, peak_gbs: float | None) -> tuple[float, float | None]:
    """(GB/s, % of peak) for ``bytes_moved`` in ``ms``."""
    gbs = bytes_moved / (ms * 1e-3) / 1e9
    return gbs, (100.0 * gbs / peak_gbs if peak_gbs else None)


def time_fwd_bwd(forward: Callable[[], object], forward_with_grad: Callable[[], object], leaves: list,
                 fwd_bytes: float, bwd_bytes: float, peak_gbs: float | None, warmup: int, rep: int) -> dict:
    """Forward (no grad), backward alone and forward+backward times, with their GB/s, % of peak and peak memory.

    ``forward_with_grad`` runs the op on ``leaves`` (tensors requiring grad); its outputs, a tensor or a tuple,
    get fixed random cotangents.
    """

    try:
        return _time_fwd_bwd(forward, forward_with_grad, leaves, fwd_bytes, bwd_bytes, peak_gbs, warmup, rep)
    except Exception as exc:  # a launch that fails at this size (seen on an H200): the row says why, the sweep goes on
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]}


def _time_fwd_bwd(forward, forward_with_grad, leaves, fwd_bytes, bwd_bytes, peak_gbs, warmup, rep) -> dict:
    def as_tuple(out):
        return out if isinstance(out, tuple) else (out,)

    with torch.no_grad():
        fwd_ms = time_fn(forward, warmup, rep)
    outs = as_tuple(forward_with_grad())
    cotangents = [torch.randn_like(o) for o in outs]
    bwd_ms = time_fn(lambda: torch.autograd.grad(outs, leaves, cotangents, retain_graph=True), warmup, rep)

    def fwd_bwd():
        torch.autograd.grad(as_tuple(forward_with_grad()), leaves, cotangents)

    fb_ms = time_fn(fwd_bwd, warmup, rep)
    fwd_gbs, fwd_pct = bandwidth(fwd_bytes, fwd_ms, peak_gbs)
    bwd_gbs, bwd_pct = bandwidth(bwd_bytes, bwd_ms, peak_gbs)
    fb_gbs, fb_pct = bandwidth(fwd_bytes + bwd_bytes, fb_ms, peak_gbs)
    return {
        "fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "fwd_bwd_ms": fb_ms, "fwd_host_ms": host_ms(forward),
        "fwd_gbs": fwd_gbs, "bwd_gbs": bwd_gbs, "fwd_bwd_gbs": fb_gbs,
        "fwd_pct_peak": fwd_pct, "bwd_pct_peak": bwd_pct, "fwd_bwd_pct_peak": fb_pct,
        "peak_mem_mib": peak_memory_mib(fwd_bwd),
    }


def bandwidth_parser(description: str, name: str, impls: str):
    """The options every memory-bound benchmark takes (--quick, --dtype, --impls, --out)."""
    import argparse

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--impls", default=None, help=f"comma-separated subset of {impls}")
    p.add_argument("--out", default=None, help=f"JSON path (default benchmarks/results/<device>/{name}.json)")
    p.add_argument("--shapes", default=None, type=parse_shapes,
                   help="comma-separated shapes instead of the default sweep, each written AxB[xC] (see the usage)")
    return p


def parse_ints(text: str, sep: str = ",") -> list[int]:
    """``"1024,4096"`` -> ``[1024, 4096]``: positive integers, for a short sweep on a GPU lent for minutes."""
    import argparse

    try:
        values = [int(v) for v in text.lower().split(sep)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {sep!r}-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """``"16384x2048,4x4096x32"`` -> ``[(16384, 2048), (4, 4096, 32)]``."""
    import argparse

    shapes = [tuple(parse_ints(item, sep="x")) for item in text.split(",") if item.strip()]
    if not shapes:
        raise argparse.ArgumentTypeError(f"expected comma-separated AxB[xC] shapes, got {text!r}")
    return shapes


def select_impls(impls: dict, device: str, wanted: str | None) -> dict:
    """The implementations to time: never Triton on a CPU (the interpreter measures Python, not the kernel), and
    with ``wanted`` (comma-separated names) only those."""
    if device == "cpu":
        impls = {k: v for k, v in impls.items() if k != "triton"}
    return impls if not wanted else {k: v for k, v in impls.items() if k in wanted.split(",")}


def print_fwd_bwd(label: str, row: dict) -> None:
    """One progress line per timed row: its forward and backward times, or its error."""
    print(f"{label}: " + (row.get("error") or f"fwd {row['fwd_ms']:.3f} ms, bwd {row['bwd_ms']:.3f} ms"), flush=True)


def report_bandwidth(name: str, title: str, rows: list[dict], meta: dict, columns: list[str],
                     out: str | Path | None = None) -> Path:
    """The end of a memory-bound benchmark: its JSON and GB/s plot written, its table printed."""
    path = save_bandwidth(name, rows, meta, out=out)
    print(f"\n{title}, {meta['dtype']}, {meta['device']} (peak {meta.get('peak_bandwidth_gbs')} GB/s)")
    print_table(rows, columns)
    print(f"\nwrote {path}")
    return path


def save_bandwidth(name: str, rows: list[dict], meta: dict, out: str | Path | None = None) -> Path:
    """A memory-bound benchmark's JSON with its GB/s plot spec; also written after every row, so a run stopped at a
    time limit keeps what it measured."""
    return write_results(name, rows, meta, out=out, plot={"x": "shape", "series": "impl", "y": ["fwd_gbs", "bwd_gbs"]})


def write_results(name: str, rows: list[dict], meta: dict, *, plot: dict | None = None, out: str | Path | None = None) -> Path:
    """Write ``{"meta", "rows", "plot"}`` to ``out`` or benchmarks/results/<device-slug>/<name>.json."""
    path = Path(out) if out else RESULTS / device_slug(meta.get("device")) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "rows": rows}
    if plot:
        payload["plot"] = plot
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def print_table(rows: Iterable[dict], columns: list[str]) -> None:
    rows = list(rows)
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
