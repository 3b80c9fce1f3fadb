"""The ``sparrow`` command line. Each concern registers its own subcommands; this module only assembles them.

    sparrow info                              versions, extensions and ops backends on this machine
    sparrow tokenizer train|merge|encode      byte-level BPE                       (cli/tokenizer.py)
    sparrow data clean|tokenize|builtin|...   corpus cleaning and token files      (cli/data.py)
    sparrow pretrain|sft|dpo|rm|pairs|demo    training stages and the demo         (cli/training.py)
    sparrow generate|chat|eval|export         using a trained model                (cli/inference.py)
    sparrow serve|rag                         OpenAI-compatible server, chat page; retrieval (cli/serve.py)
    sparrow bench                             the benchmark runner                 (bench_cli.py)

A command module parses arguments and calls the library; it computes nothing of its own.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules providing ``register(subparsers)``, in the order their commands are listed.
COMMAND_MODULES = (
    "sparrow.cli.tokenizer",
    "sparrow.cli.data",
    "sparrow.cli.training",
    "sparrow.cli.inference",
    "sparrow.bench_cli",
    "sparrow.cli.serve",
)


def info(args: argparse.Namespace) -> int:
    import platform

    import torch

    import sparrow
    from sparrow import ops

    rows = [
        ("sparrow", sparrow.__version__),
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda})"),
        ("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none"),
    ]
    try:
        import triton

        rows.append(("triton", triton.__version__))
    except ImportError:
        rows.append(("triton", "not installed"))
    for module in ("sparrow._bpe", "sparrow._C"):
        try:
            importlib.import_module(module)
            rows.append((module, "built"))
        except ImportError as exc:
            rows.append((module, f"missing ({exc})"))
    for backend in ops.BACKENDS:
        error = ops.backend_error(backend)
        rows.append((f"backend {backend}", "available" if error is None else f"unavailable: {error}"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparrow", description="Train small Llama-style language models from scratch, fast.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    info_parser = subparsers.add_parser("info", help="versions, compiled extensions and ops backends")
    info_parser.set_defaults(func=info)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        # Bad input is reported as one line, not a traceback: the message names the file, key or argument.
        print(f"sparrow {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
