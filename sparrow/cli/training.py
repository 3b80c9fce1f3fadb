"""Training commands: ``sparrow pretrain|sft|dpo|rm|grpo`` (one set of config arguments, one run wrapper), ``pairs``
(preference pairs for dpo/rm from your own checkpoint) and ``demo`` (the whole chain on the built-in data).

Each stage reads ``--config`` (YAML: the Trainer's ``model``/``data``/``train`` sections, plus the stage's own
section for sft, dpo, rm and grpo, see :mod:`sparrow.post_training.stages`), then ``section.key=value`` overrides.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CONFIG = "configs/pretrain_tiny.yaml"

STAGES = {
    "sft": "supervised fine-tuning on chat jsonl (messages or instruction/input/output)",
    "dpo": "direct preference optimisation on prompt/chosen/rejected jsonl",
    "rm": "train a reward model (Bradley-Terry) on prompt/chosen/rejected jsonl",
    "grpo": "GRPO with verifiable rewards on the built-in questions or prompt/reference jsonl",
}


def add_config_arguments(parser: argparse.ArgumentParser, config_help: str) -> None:
    parser.add_argument("--config", default=None, help=config_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=3e-4 or --set dpo.beta=0.2 (repeatable)")
    parser.add_argument("positional_overrides", nargs="*", metavar="KEY=VALUE", help="overrides, as --set")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.out_dir")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "pretrain", help="pretrain a model (default: the tiny preset on the built-in corpus, minutes on a CPU)",
        description="Pretrain on packed token data. Without --config, configs/pretrain_tiny.yaml is used if present "
                    "(else the same built-in defaults). Under torchrun each process runs one rank.")
    add_config_arguments(parser, f"YAML config (default: {DEFAULT_CONFIG})")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.set_defaults(func=run_pretrain)

    for stage, text in STAGES.items():
        parser = subparsers.add_parser(stage, help=text, description=text + ". See sparrow.post_training.stages for the keys.")
        add_config_arguments(parser, "YAML: model/data/train sections plus the stage's own section")
        parser.set_defaults(func=run_stage, stage=stage)

    parser = subparsers.add_parser(
        "pairs", help="preference pairs from your own checkpoint: its sampled answers rejected against the references",
        description="For each conversation's last user turn, sample MODEL's answer; write {prompt, chosen: the "
                    "reference answer, rejected: the sample} unless the two are near-identical.")
    parser.add_argument("model", help="a (weaker or earlier) model folder, e.g. an early SFT checkpoint")
    parser.add_argument("data", help="conversations jsonl (messages or instruction/output), as for `sparrow sft`")
    parser.add_argument("out", help="output pairs .jsonl (for `sparrow dpo` / `sparrow rm`)")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many conversations (a seeded sample)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--max-similarity", type=float, default=0.8, help="drop pairs more similar than this (0-1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--template", default="sparrow", help="chat template: sparrow or qa")
    parser.set_defaults(func=run_pairs)

    parser = subparsers.add_parser("demo", help="tokenizer, pretrain, SFT, DPO, GRPO, evaluation and export on the built-in data")
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--minutes", type=float, default=None,
                        help="scale every stage's steps to this budget on 2 CPU cores (default: the 12-minute demo's "
                             "step counts); --*-steps override single stages")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="default 240")
    parser.add_argument("--sft-steps", type=int, default=None, help="default 300")
    parser.add_argument("--dpo-steps", type=int, default=None, help="default 60")
    parser.add_argument("--grpo-steps", type=int, default=None, help="default 60; 0 stops after DPO")
    parser.add_argument("--eval-per-task", type=int, default=100, help="held-out exact-match items of each task")
    parser.add_argument("--preset", default=None, help="model preset the demo pretrains (default: the pretraining "
                        "config's, tiny; moe-tiny for a mixture of experts)")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 unless every learning claim holds (SFT raises exact match; DPO raises "
                             "preference accuracy and margin without lowering it); GRPO's claims are reported, not "
                             "gating, until shown at the default budget")
    parser.set_defaults(func=run_demo)


def _overrides(args: argparse.Namespace) -> list[str]:
    return [*args.overrides, *args.positional_overrides]


def run_training(command: str, run):
    """``run()`` (build and fit a Trainer) for ``sparrow <command>``: its result, or None when a non-finite loss
    stopped it (said in one line); the process group (under torchrun) is shut down either way."""
    from ..train import distributed
    from ..train.trainer import NonFiniteLossError

    try:
        return run()
    except NonFiniteLossError as exc:
        print(f"sparrow {command}: stopped: {exc}", file=sys.stderr)
        return None
    finally:
        distributed.shutdown()


def run_pretrain(args: argparse.Namespace) -> int:
    from ..train.config import load_config
    from ..train.pretrain import pretrain

    path = args.config
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = DEFAULT_CONFIG
    config = load_config(path, _overrides(args))
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    return 0 if run_training("pretrain", lambda: pretrain(config, resume=args.resume)) is not None else 1


def run_stage(args: argparse.Namespace) -> int:
    from ..post_training.stages import BUILDERS, load_stage_config

    config, options = load_stage_config(args.stage, args.config, _overrides(args))
    result = run_training(args.stage, lambda: BUILDERS[args.stage](config, options).fit(resume=args.resume))
    if result is None:
        return 1
    print(f"done: step {result.step}, val loss {result.val_loss}; model in {result.out_dir / 'model'}")
    return 0


def run_pairs(args: argparse.Namespace) -> int:
    from ..model_folder import load_model_and_tokenizer
    from ..post_training.preference_data import build_pairs, last_turn_examples, write_pairs

    model, tok = load_model_and_tokenizer(args.model)
    examples = last_turn_examples(args.data, limit=args.limit, seed=args.seed)
    pairs = build_pairs(model, tok, examples, template=args.template, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                        max_similarity=args.max_similarity)
    write_pairs(pairs, args.out)
    print(f"wrote {len(pairs)} pairs to {args.out} ({len(examples) - len(pairs)} dropped as near-identical or empty)")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo as demo
    from ..demo import scaled_steps

    steps = scaled_steps(args.minutes)
    for stage in steps:
        given = getattr(args, f"{stage}_steps")
        if given is not None:
            steps[stage] = given
    result = demo(args.out, pretrain_steps=steps["pretrain"], sft_steps=steps["sft"], dpo_steps=steps["dpo"],
                  grpo_steps=steps["grpo"], eval_per_task=args.eval_per_task,
                  overrides={"model.preset": args.preset} if args.preset else None)
    failed = [c["claim"] for c in result["checks"] if not c["passed"] and c.get("required", True)]
    if failed and args.check:
        print(f"demo: {len(failed)} learning check(s) failed: {'; '.join(failed)}")
        return 1
    return 0
