"""``sparrow bench``: the benchmark runner (``python -m benchmarks``) from the command line.

The benchmarks live in the source tree (``benchmarks/`` next to ``sparrow/``), not in the package: they need
the test-only vocabularies and write results into the checkout. So the command works from a source checkout
(``pip install -e .``) and says so elsewhere.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# The checkout holding the sparrow package being run.
SOURCE_ROOT = Path(__file__).resolve().parent.parent


def benchmarks_dir(root: Path | None = None) -> Path:
    """The checkout's benchmarks/ folder; FileNotFoundError when sparrow is not run from a checkout."""
    root = SOURCE_ROOT if root is None else root
    folder = root / "benchmarks"
    # pyproject.toml naming this project tells a checkout apart from site-packages, where some other
    # distribution may have installed a top-level "benchmarks" of its own.
    pyproject = root / "pyproject.toml"
    ours = pyproject.is_file() and 'name = "sparrow-llm"' in pyproject.read_text(encoding="utf-8", errors="replace")
    if not ours or not (folder / "__main__.py").is_file():
        raise FileNotFoundError(
            f"{folder}: no benchmarks here. They ship with the source tree, not the wheel: clone the repository, "
            "`pip install --no-build-isolation -e .` there, and run `sparrow bench` (or `python -m benchmarks`) from it"
        )
    return folder


def _bench_names() -> list[str] | None:
    try:
        folder = benchmarks_dir()
    except FileNotFoundError:
        return None
    return sorted(p.stem.removeprefix("bench_") for p in folder.glob("bench_*.py"))


def run(args: argparse.Namespace) -> int:
    folder = benchmarks_dir()
    root = str(folder.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    runner = importlib.import_module("benchmarks.__main__")
    if Path(runner.__file__).resolve().parent != folder:
        raise FileNotFoundError(f"{folder}: `import benchmarks` found {runner.__file__} instead")
    argv = ["--quick"] if args.quick else []
    for name in args.only or []:
        argv += ["--only", name]
    if args.results is not None:
        argv += ["--results", str(args.results)]
    return runner.main(argv)


def register(subparsers) -> None:
    names = _bench_names()
    parser = subparsers.add_parser(
        "bench", help="run the benchmarks (source checkout only)",
        description="Run every benchmark (or --only NAME), write JSON and a plot per benchmark. "
                    "Same as `python -m benchmarks` in the source tree.",
    )
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke run that works on a CPU")
    parser.add_argument("--only", action="append", choices=names, metavar="NAME",
                        help="run just this benchmark (repeatable)" + (f": {', '.join(names)}" if names else ""))
    parser.add_argument("--results", type=Path, help="output folder (default benchmarks/results/<device>)")
    parser.set_defaults(func=run)
