"""``sparrow pretrain``: ``--config`` a YAML file (default: the tiny preset, which is also the built-in default),
then ``section.key=value`` overrides, positional or with ``--set``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CONFIG = "configs/pretrain_tiny.yaml"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "pretrain", help="pretrain a model (default: the tiny preset on the built-in corpus, minutes on a CPU)",
        description="Pretrain on packed token data. Without --config, configs/pretrain_tiny.yaml is used if present "
                    "(else the same built-in defaults). Under torchrun each process runs one rank.")
    parser.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=3e-4 (repeatable)")
    parser.add_argument("positional_overrides", nargs="*", metavar="KEY=VALUE", help="overrides, as --set")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.out_dir")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.set_defaults(func=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    from ..train import distributed
    from ..train.config import load_config
    from ..train.pretrain import pretrain
    from ..train.trainer import NonFiniteLossError

    path = args.config
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = DEFAULT_CONFIG
    config = load_config(path, [*args.overrides, *args.positional_overrides])
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    try:
        pretrain(config, resume=args.resume)
    except NonFiniteLossError as exc:
        print(f"sparrow pretrain: stopped: {exc}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
    return 0
