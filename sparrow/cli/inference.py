"""Commands that use a trained model: ``sparrow generate|chat|eval|export``. Each loads the model and its tokenizer
with :func:`sparrow.model_folder.load_model_and_tokenizer` (a model folder or a checkpoint's)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--template", default=None, help="chat template: sparrow or qa (default: the model folder's, "
                        "a checkpoint's Jinja included)")


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="continue a prompt (or a chat question with --chat)")
    parser.add_argument("model", help="a model folder (with tokenizer.json)")
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--chat", action="store_true", help="ask each prompt as a user turn of the chat template")
    _add_sampling(parser)
    parser.set_defaults(func=run_generate)

    parser = subparsers.add_parser("chat", help="interactive multi-turn chat, streamed")
    parser.add_argument("model")
    parser.add_argument("--system", default=None)
    parser.add_argument("--rag", default=None, metavar="INDEX", help="put passages retrieved from INDEX (`sparrow rag "
                        "index`) before each question")
    parser.add_argument("--rag-k", type=int, default=2, help="passages retrieved per question")
    _add_sampling(parser)
    parser.set_defaults(func=run_chat, temperature=0.7, top_p=0.9)

    parser = subparsers.add_parser(
        "eval", help="exact match, perplexity and preference accuracy; a table and JSON",
        description="Scores MODEL on the built-in corpus's held-out questions: PER_TASK of each task, the sample "
                    "`sparrow demo` scores (same --seed and --num-people as the corpus the model learnt), so the "
                    "two print the same figures for the same model.")
    parser.add_argument("model")
    parser.add_argument("--reference", default=None, help="reference model for the implicit DPO reward")
    parser.add_argument("--reward-model", default=None, help="a reward model folder (from `sparrow rm`)")
    parser.add_argument("--pairs", default=None, help="held-out prompt/chosen/rejected jsonl")
    parser.add_argument("--max-length", type=int, default=256, help="pairs: longest encoded conversation (the demo: 192)")
    parser.add_argument("--text", default=None, help="held-out text (.txt/.jsonl) for perplexity; default: the items' QA text")
    parser.add_argument("--template", default=None, help="chat template for exact match (default: the model's); "
                        "'none' for raw prompts")
    parser.add_argument("--per-task", type=int, default=100, help="held-out exact-match items of each task (as the demo)")
    parser.add_argument("--seed", type=int, default=0, help="the built-in corpus's seed (data.builtin_seed)")
    parser.add_argument("--num-people", type=int, default=240, help="the built-in corpus's data.builtin_num_people")
    parser.add_argument("--limit", type=int, default=None, help="score only the first LIMIT items of the sample")
    parser.add_argument("--out", default=None, help="JSON output (default: <model>/eval.json)")
    parser.set_defaults(func=run_eval)

    parser = subparsers.add_parser("export", help="write a Hugging Face Llama folder (transformers loads it as is)")
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    parser.add_argument("--template", default=None, help="chat template to save: sparrow or qa (default: the tokenizer's)")
    parser.set_defaults(func=run_export)


def _sampling(args: argparse.Namespace, tok):
    from ..generate import GenerationConfig

    return GenerationConfig.for_tokenizer(tok, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                          top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                                          no_repeat_ngram_size=args.no_repeat_ngram_size, seed=args.seed)


def run_generate(args: argparse.Namespace) -> int:
    from ..generate import generate
    from ..model_folder import load_model_and_tokenizer
    from ..tokenizer.chat import decode_answer, encode_text, prompt_ids

    model, tok = load_model_and_tokenizer(args.model)
    config = _sampling(args, tok)
    prompts = [prompt_ids(tok, p, args.template) if args.chat else encode_text(tok, p) for p in args.prompts]
    for prompt, out in zip(args.prompts, generate(model, prompts, config)):
        answer = decode_answer(tok, out)
        print(answer if len(args.prompts) == 1 else json.dumps({"prompt": prompt, "output": answer}, ensure_ascii=False))
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from ..generate import stream_text
    from ..model_folder import load_model_and_tokenizer
    from ..tokenizer.chat import encode_messages

    model, tok = load_model_and_tokenizer(args.model)
    config = _sampling(args, tok)
    index = None
    if args.rag:
        from ..rag import RagIndex

        index = RagIndex.load(args.rag)
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
        messages.append({"role": "user", "content": index.augment(line, args.rag_k) if index is not None else line})
        prompt = encode_messages(tok, messages, args.template, add_generation_prompt=True)
        if len(prompt) + config.max_new_tokens > model.config.max_position_embeddings:
            print("(context full: starting over)")
            messages = messages[-1:]
            prompt = encode_messages(tok, messages, args.template, add_generation_prompt=True)
        pieces = []
        for piece in stream_text(model, tok, prompt, config):
            print(piece, end="", flush=True)
            pieces.append(piece)
        print()
        messages.append({"role": "assistant", "content": "".join(pieces)})
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..data.builtin_corpus import TASKS, qa_text
    from ..model_folder import load_model_and_tokenizer
    from ..post_training.evaluation import evaluate, heldout_sample

    model, tok = load_model_and_tokenizer(args.model)
    items = heldout_sample(args.seed, args.per_task, args.num_people)[:args.limit]
    if args.text:
        from ..data import iter_texts

        texts = list(iter_texts(args.text))
    else:
        texts = [qa_text(i) for i in items]
    from ..tokenizer.chat import template_for

    template = None if args.template == "none" else template_for(tok, args.template)
    pairs = reference = reward_model = None
    if args.pairs:
        from ..post_training.preference_data import PreferenceDataset, read_pairs

        rows = read_pairs(args.pairs)
        pairs = PreferenceDataset(rows, tok, template=template_for(tok, template), max_length=args.max_length,
                                  val_pairs=rows).all_pairs("val")
        if args.reward_model:
            from ..post_training.reward_model import RewardModel

            reward_model = RewardModel.from_pretrained(args.reward_model).eval()
        elif args.reference:
            reference = load_model_and_tokenizer(args.reference)[0]
    result = evaluate(model, tok, items, template=template, world=(args.seed, args.num_people), texts=texts,
                      pairs=pairs, reference=reference, reward_model=reward_model)
    rows = [("exact match (held-out)", f"{result['exact_match']:.3f}")]
    rows += [(f"  {task}", f"{result['by_task'][task]:.3f}") for task in TASKS if task in result["by_task"]]
    rows += [("typed answers", f"{result['typed_answer']:.3f}"),
             ("perplexity" if args.text else "perplexity (held-out QA text)", f"{result['perplexity']:.3f}")]
    if pairs is not None:
        rows += [("preference accuracy", f"{result['preference']['preference_accuracy']:.3f}"),
                 ("preference margin", f"{result['preference']['margin']:.4f}")]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    out = Path(args.out or Path(args.model) / "eval.json")
    report = {"model": args.model, "items": len(items), **{k: v for k, v in result.items() if k != "answers"}}
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"written: {out}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from ..export import export_hf
    from ..tokenizer.chat import TEMPLATES

    if args.template is not None and args.template not in TEMPLATES:
        raise ValueError(f"--template: must be one of {sorted(TEMPLATES)}")
    out = export_hf(args.model, args.tokenizer or args.model, args.out,
                    chat_template=TEMPLATES[args.template] if args.template else None)
    print(f"exported: {out}")
    return 0
