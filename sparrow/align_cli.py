"""Commands after pretraining: ``sparrow sft|dpo|rm`` (config-driven training stages), ``generate``, ``chat``,
``eval``, ``export`` and ``demo`` (the whole chain on the built-in data)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML: model/data/train sections plus the stage's own section")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key, e.g. --set dpo.beta=0.2 or --set train.lr=1e-4 (repeatable)")
    parser.add_argument("positional_overrides", nargs="*", metavar="KEY=VALUE", help="overrides, as --set")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.out_dir")


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--template", default="sparrow", help="chat template: sparrow or qa")


def register(subparsers) -> None:
    for stage, text in (("sft", "supervised fine-tuning on chat jsonl (messages or instruction/input/output)"),
                        ("dpo", "direct preference optimisation on prompt/chosen/rejected jsonl"),
                        ("rm", "train a reward model (Bradley-Terry) on prompt/chosen/rejected jsonl")):
        parser = subparsers.add_parser(stage, help=text, description=text + ". See sparrow.stages for the keys.")
        _add_overrides(parser)
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

    parser = subparsers.add_parser("generate", help="continue a prompt (or a chat question with --chat)")
    parser.add_argument("model", help="a model folder (with tokenizer.json)")
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--chat", action="store_true", help="ask each prompt as a user turn of the chat template")
    _add_sampling(parser)
    parser.set_defaults(func=run_generate)

    parser = subparsers.add_parser("chat", help="interactive multi-turn chat, streamed")
    parser.add_argument("model")
    parser.add_argument("--system", default=None)
    _add_sampling(parser)
    parser.set_defaults(func=run_chat, temperature=0.7, top_p=0.9)

    parser = subparsers.add_parser("eval", help="perplexity, exact match and preference accuracy; a table and JSON")
    parser.add_argument("model")
    parser.add_argument("--reference", default=None, help="reference model for the implicit DPO reward")
    parser.add_argument("--reward-model", default=None, help="a reward model folder (from `sparrow rm`)")
    parser.add_argument("--pairs", default=None, help="held-out prompt/chosen/rejected jsonl")
    parser.add_argument("--text", default=None, help="held-out text (.txt/.jsonl) for perplexity; default: built-in")
    parser.add_argument("--template", default="sparrow", help="chat template for exact match; 'none' for raw prompts")
    parser.add_argument("--limit", type=int, default=200, help="held-out exact-match items")
    parser.add_argument("--out", default=None, help="JSON output (default: <model>/eval.json)")
    parser.set_defaults(func=run_eval)

    parser = subparsers.add_parser("export", help="write a Hugging Face Llama folder (transformers loads it as is)")
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    parser.add_argument("--template", default=None, help="chat template to save: sparrow or qa (default: the tokenizer's)")
    parser.set_defaults(func=run_export)

    parser = subparsers.add_parser("demo", help="tokenizer, pretrain, SFT, DPO, evaluation and export on the built-in data")
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--pretrain-steps", type=int, default=240)
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--dpo-steps", type=int, default=60)
    parser.add_argument("--preset", default="tiny", help="model preset pretrained by the demo (tiny, moe-tiny)")
    parser.add_argument("--eval-per-task", type=int, default=100, help="held-out exact-match items of each task")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 unless every learning claim holds (SFT raises exact match; DPO raises "
                             "preference accuracy and margin without lowering it)")
    parser.set_defaults(func=run_demo)


def run_stage(args: argparse.Namespace) -> int:
    from . import stages
    from .train import distributed
    from .train.trainer import NonFiniteLossError

    config, options = stages.load_stage_config(args.stage, args.config, [*args.overrides, *args.positional_overrides])
    build = {"sft": stages.build_sft, "dpo": stages.build_dpo, "rm": stages.build_rm}[args.stage]
    try:
        result = build(config, options).fit(resume=args.resume)
    except NonFiniteLossError as exc:
        print(f"sparrow {args.stage}: stopped: {exc}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
    print(f"done: step {result.step}, val loss {result.val_loss}; model in {result.out_dir / 'model'}")
    return 0


def _load(model_dir: str):
    from .model import SparrowForCausalLM
    from .tokenizer import Tokenizer

    path = Path(model_dir)
    # A checkpoint's model folder (<out_dir>/checkpoints/step_N/model) finds the run's tokenizer in <out_dir>.
    for folder in (path, *list(path.parents)[:3]):
        if (folder / "tokenizer.json").is_file():
            return SparrowForCausalLM.from_pretrained(path).eval(), Tokenizer.from_file(folder / "tokenizer.json")
    raise FileNotFoundError(f"{path / 'tokenizer.json'}: not found (a model folder written by a training stage has it, "
                            "and a checkpoint's run folder)")


def _sampling(args, tok):
    from .generate import GenerationConfig
    from .preference import stop_ids

    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                            no_repeat_ngram_size=args.no_repeat_ngram_size, stop_ids=stop_ids(tok), seed=args.seed,
                            vocab_limit=tok.vocab_size)


def run_generate(args: argparse.Namespace) -> int:
    from .generate import generate
    from .sft import render

    model, tok = _load(args.model)
    config = _sampling(args, tok)
    texts = [render([{"role": "user", "content": p}], args.template, add_generation_prompt=True) if args.chat else p
             for p in args.prompts]
    outputs = generate(model, [tok.encode(t, allowed_special="all") for t in texts], config)
    for prompt, out in zip(args.prompts, outputs):
        answer = tok.decode([t for t in out if t not in config.stop_ids])
        print(answer if len(args.prompts) == 1 else json.dumps({"prompt": prompt, "output": answer}, ensure_ascii=False))
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from .generate import stream_text
    from .sft import render

    model, tok = _load(args.model)
    config = _sampling(args, tok)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chat: empty line or Ctrl-D to quit, /reset to start over")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        prompt = tok.encode(render(messages, args.template, add_generation_prompt=True), allowed_special="all")
        if len(prompt) + config.max_new_tokens > model.config.max_position_embeddings:
            print("(context full: starting over)")
            messages = messages[-1:]
            prompt = tok.encode(render(messages, args.template, add_generation_prompt=True), allowed_special="all")
        pieces = []
        for piece in stream_text(model, tok, prompt, config):
            print(piece, end="", flush=True)
            pieces.append(piece)
        print()
        messages.append({"role": "assistant", "content": "".join(pieces)})
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import random

    from .data.builtin_corpus import eval_items, qa_text
    from .evaluate import exact_match, perplexity, preference_accuracy

    model, tok = _load(args.model)
    results: dict = {"model": args.model}
    items = eval_items(split="heldout")
    random.Random(0).shuffle(items)
    items = items[:args.limit]
    if args.text:
        from .data import iter_texts

        texts = list(iter_texts(args.text))
    else:
        texts = [qa_text(i) for i in items]
    results["perplexity"] = perplexity(model, [tok.encode(t) for t in texts])
    if args.template == "none":
        results["exact_match"] = exact_match(model, tok, items)["exact_match"]
    else:
        results["exact_match"] = exact_match(model, tok, items, chat_template=args.template)["exact_match"]
    if args.pairs:
        from .preference import PreferenceDataset, read_pairs

        pairs = read_pairs(args.pairs)
        batch = PreferenceDataset(pairs, tok, template=args.template if args.template != "none" else "sparrow",
                                  val_pairs=pairs).all_pairs("val")
        if args.reward_model:
            from .align import RewardModel

            rm = RewardModel.from_pretrained(args.reward_model).eval()
            results["preference"] = preference_accuracy(batch, reward_model=rm)
        else:
            reference = _load(args.reference)[0] if args.reference else None
            results["preference"] = preference_accuracy(batch, policy=model, reference=reference)
    rows = [("perplexity (held-out QA text)" if not args.text else "perplexity", f"{results['perplexity']:.3f}"),
            ("exact match (held-out)", f"{results['exact_match']:.3f}")]
    if "preference" in results:
        rows += [("preference accuracy", f"{results['preference']['preference_accuracy']:.3f}"),
                 ("preference margin", f"{results['preference']['margin']:.4f}")]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    out = Path(args.out or Path(args.model) / "eval.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {out}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from .export import export_hf
    from .sft import TEMPLATES

    if args.template is not None and args.template not in TEMPLATES:
        raise ValueError(f"--template: must be one of {sorted(TEMPLATES)}")
    out = export_hf(args.model, args.tokenizer or args.model, args.out,
                    chat_template=TEMPLATES[args.template] if args.template else None)
    print(f"exported: {out}")
    return 0


def run_pairs(args: argparse.Namespace) -> int:
    import random

    from .preference import build_pairs, write_pairs
    from .sft import read_records, to_messages

    model, tok = _load(args.model)
    examples = []
    for i, record in enumerate(read_records(args.data), 1):
        messages = to_messages(record)
        if messages[-1]["role"] != "assistant" or len(messages) < 2 or messages[-2]["role"] != "user":
            raise ValueError(f"{args.data}:{i}: the conversation must end with a user turn and its assistant answer")
        examples.append((messages[-2]["content"], messages[-1]["content"]))
    if args.limit is not None and args.limit < len(examples):
        examples = random.Random(args.seed).sample(examples, args.limit)
    pairs = build_pairs(model, tok, examples, template=args.template, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                        max_similarity=args.max_similarity)
    write_pairs(pairs, args.out)
    print(f"wrote {len(pairs)} pairs to {args.out} ({len(examples) - len(pairs)} dropped as near-identical or empty)")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo as demo

    result = demo(args.out, pretrain_steps=args.pretrain_steps, sft_steps=args.sft_steps, dpo_steps=args.dpo_steps,
                  eval_per_task=args.eval_per_task, overrides={"model.preset": args.preset})
    failed = [c["claim"] for c in result["checks"] if not c["passed"]]
    if failed and args.check:
        print(f"demo: {len(failed)} learning check(s) failed: {'; '.join(failed)}")
        return 1
    return 0
