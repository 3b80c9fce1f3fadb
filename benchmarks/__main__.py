"""Run every benchmark (or ``--only NAME``), then plot each result: speed against shape, one line per
implementation. Results go to ``benchmarks/results/<device>/`` unless ``--results`` says otherwise.

    python -m benchmarks [--quick] [--only rmsnorm] [--results DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover() -> dict[str, Path]:
    return {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py"))}


def device_slug() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
        else:
            import platform

            name = f"cpu-{platform.machine()}"
    except ImportError:
        name = "cpu"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower()


def plot(result_path: Path) -> Path | None:
    """speed vs shape, one line per implementation, one panel per y metric."""
    data = json.loads(result_path.read_text())
    spec, rows = data.get("plot"), data.get("rows", [])
    if not spec or not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, series_key = spec["x"], spec["series"]
    y_keys = spec["y"] if isinstance(spec["y"], list) else [spec["y"]]
    fig, axes = plt.subplots(1, len(y_keys), figsize=(6 * len(y_keys), 4), squeeze=False)
    for ax, y_key in zip(axes[0], y_keys):
        series: dict[str, list[tuple]] = {}
        for row in rows:
            if row.get(y_key) is None or row.get(x_key) is None:
                continue
            series.setdefault(str(row[series_key]), []).append((row[x_key], row[y_key]))
        labels = sorted({str(r[x_key]) for r in rows if r.get(x_key) is not None}, key=_natural)
        for name, points in sorted(series.items()):
            points.sort(key=lambda p: labels.index(str(p[0])))
            ax.plot([labels.index(str(x)) for x, _ in points], [y for _, y in points], marker="o", label=name)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_xlabel(x_key)
        ax.set_ylabel(y_key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result_path.stem} on {data.get('meta', {}).get('device', '?')}")
    fig.tight_layout()
    out = result_path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _natural(label: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", label)]


def main(argv: list[str] | None = None) -> int:
    benches = discover()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke run that works on a CPU")
    parser.add_argument("--only", action="append", choices=sorted(benches), help="run just this benchmark (repeatable)")
    parser.add_argument("--results", type=Path, help="output folder (default benchmarks/results/<device>)")
    args = parser.parse_args(argv)
    results = args.results or HERE / "results" / device_slug()
    results.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in args.only or sorted(benches):
        out = results / f"{name}.json"
        cmd = [sys.executable, str(benches[name]), "--out", str(out)] + (["--quick"] if args.quick else [])
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.time()
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
            continue
        try:
            png = plot(out) if out.exists() else None
        except ImportError as exc:  # the bare GPU machines may lack matplotlib; the JSON is the result
            print(f"--- {name}: not plotted ({exc})", flush=True)
            png = None
        print(f"--- {name}: {time.time() - start:.0f} s, {out}" + (f", {png}" if png else ""), flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
