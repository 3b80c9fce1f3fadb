"""``sparrow demo``: the whole chain on the built-in data, on a CPU, with no downloads.

pretrain (tokenizer + tiny model on the built-in corpus) -> SFT on chat-formatted questions about the corpus ->
preference pairs (an early SFT checkpoint's sampled answers rejected against the reference answers) -> DPO ->
evaluation after each stage on held-out items -> a few chat samples -> an exported Hugging Face folder.

Held out throughout: exact-match questions never asked in training (``eval_items(split="heldout")``), and
preference pairs built from those questions. Preference accuracy and margin are the implicit reward
``beta * (log pi - log pi_pretrained)`` of chosen over rejected, so SFT and DPO are scored against the same
reference; the DPO row adds the reward against its own reference (the SFT model). The report folder holds metrics.json, each stage's loss.png and
the exported model.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any


from .data.builtin_corpus import EvalItem, _arith_question, _heldout_pairs, eval_items
from .evaluate import exact_match, preference_accuracy
from .model import SparrowForCausalLM

_QUESTION = re.compile(r"^(?:Question: |问题：)(.*)\n(?:Answer:|答案：)$", re.S)


def question_of(item: EvalItem) -> str:
    """The bare question of an item's "Question: ...\\nAnswer:" prompt: the user turn of a chat."""
    match = _QUESTION.match(item.prompt)
    return match.group(1) if match else item.prompt


def arithmetic_training_items(seed: int, count: int) -> list[EvalItem]:
    """Arithmetic questions on operand pairs the corpus may state (never the held-out ones)."""
    rng = random.Random(f"sparrow-demo-sft-{seed}")
    heldout = _heldout_pairs(seed)
    items = []
    while len(items) < count:
        op = rng.choice(("add", "sub", "mul"))
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "mul" else (rng.randint(10, 99), rng.randint(10, 99))
        if op == "sub" and a < b:
            a, b = b, a
        if tuple(sorted((a, b))) in heldout[op]:
            continue
        items.append(_arith_question(op, a, b, rng.choice(("en", "zh"))))
    return items


def chat_record(item: EvalItem) -> dict:
    return {"messages": [{"role": "user", "content": question_of(item)}, {"role": "assistant", "content": item.answer}]}


def chat_items(items: list[EvalItem]) -> list[EvalItem]:
    """The items with their prompts as bare questions: asked as chat turns, for exact_match with a template."""
    return [EvalItem(question_of(i), i.answer, i.lang, i.kind, i.split) for i in items]


def _loss_tail(result) -> float:
    tail = list(result.losses.values())[-10:]
    return sum(tail) / len(tail) if tail else float("nan")


def run_demo(out: str | Path = "runs/demo", *, pretrain_steps: int = 240, sft_steps: int = 300, dpo_steps: int = 60,
             eval_limit: int = 200, seed: int = 0, log=print) -> dict[str, Any]:
    from .export import export_hf
    from .preference import PreferenceDataset, build_pairs
    from .sft import TEMPLATES
    from .stages import StageOptions, build_dpo, build_sft
    from .tokenizer import Tokenizer
    from .train import build_pretraining
    from .train.config import Config

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    report = out / "report"
    report.mkdir(parents=True)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    rows: list[dict[str, Any]] = []

    def stage_config(name: str, steps: int, lr: float, batch: int, init_from: str | None) -> Config:
        c = Config()
        c.data.cache_dir = "runs/cache"  # the built-in corpus's tokenizer and tokens, shared with `sparrow pretrain`
        c.data.micro_batch_size = batch
        c.model.init_from = init_from
        c.train.out_dir = str(out / name)
        c.train.max_steps = steps
        c.train.lr = lr
        c.train.warmup_steps = max(1, steps // 10)
        c.train.save_every = 0
        c.train.eval_every = 0
        c.train.log_every = max(1, steps // 6)
        c.train.progress = False
        c.train.seed = seed
        return c

    # ----------------------------------------------------------------------------------------- pretrain
    t0 = time.perf_counter()
    config = stage_config("pretrain", pretrain_steps, 3e-3, 8, None)
    trainer = build_pretraining(config, log=log)
    pre = trainer.fit()
    timings["pretrain"] = time.perf_counter() - t0
    pre_dir = out / "pretrain" / "model"
    tok = Tokenizer.from_file(pre_dir / "tokenizer.json")
    model = SparrowForCausalLM.from_pretrained(pre_dir).eval()
    heldout = eval_items(seed, split="heldout")
    random.Random(seed).shuffle(heldout)
    heldout = heldout[:eval_limit]
    chat_heldout = chat_items(heldout)
    em_raw = exact_match(model, tok, heldout)
    em_chat = exact_match(model, tok, chat_heldout, chat_template="sparrow")
    rows.append({"stage": "pretrain", "loss": _loss_tail(pre), "val_ppl": math.exp(pre.val_loss) if pre.val_loss else None,
                 "exact_match_raw_prompt": em_raw["exact_match"], "exact_match_chat": em_chat["exact_match"]})
    log(f"pretrain: exact match {em_raw['exact_match']:.3f} (raw prompt), {em_chat['exact_match']:.3f} (chat)")

    # ---------------------------------------------------------------------------------------------- SFT
    t0 = time.perf_counter()
    seen = eval_items(seed, split="seen")
    records = [chat_record(i) for i in seen + arithmetic_training_items(seed, len(seen) // 2)]
    sft_config = stage_config("sft", sft_steps, 1e-3, 16, str(pre_dir))
    sft_config.data.seq_len = 96  # chats are short; the Trainer reports tokens per step from this bound
    sft_config.train.save_every = max(1, sft_steps // 4)  # the first checkpoint is the weak model DPO rejects
    sft_config.train.keep_checkpoints = 8
    sft = build_sft(sft_config, StageOptions(data="<built-in>", max_length=96), records=records, log=log).fit()
    timings["sft"] = time.perf_counter() - t0
    sft_dir = out / "sft" / "model"
    sft_model = SparrowForCausalLM.from_pretrained(sft_dir).eval()
    em_sft = exact_match(sft_model, tok, chat_heldout, chat_template="sparrow")
    log(f"sft: exact match {em_sft['exact_match']:.3f} (chat)")

    # ------------------------------------------------------------------------------- preference pairs
    t0 = time.perf_counter()
    from .train.checkpoint import list_checkpoints

    weak = SparrowForCausalLM.from_pretrained(list_checkpoints(out / "sft")[0] / "model").eval()
    train_items = random.Random(seed + 1).sample(seen, min(len(seen), 600))
    # Answers are a few tokens; a short budget keeps rejected samples comparable in length to them.
    train_pairs = build_pairs(weak, tok, [(question_of(i), i.answer) for i in train_items], temperature=1.0,
                              max_new_tokens=8, seed=seed)
    val_pairs = build_pairs(weak, tok, [(question_of(i), i.answer) for i in heldout], temperature=1.0,
                            max_new_tokens=8, seed=seed + 1)
    for name, pairs in (("train", train_pairs), ("heldout", val_pairs)):
        (report / f"pairs_{name}.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs),
                                                    encoding="utf-8")
    timings["pairs"] = time.perf_counter() - t0
    log(f"preference pairs: {len(train_pairs)} for training, {len(val_pairs)} held out")
    held_pairs = PreferenceDataset(val_pairs, tok, val_pairs=val_pairs).all_pairs("val")
    # Rewards relative to the pretrained model, a reference shared by both stages: a summed log-prob alone
    # would mostly measure length (the weak model's rejected samples are longer than the reference answers).
    pref_sft = preference_accuracy(held_pairs, policy=sft_model, reference=model)
    rows.append({"stage": "sft", "loss": _loss_tail(sft), "val_ppl": math.exp(sft.val_loss) if sft.val_loss else None,
                 "exact_match_chat": em_sft["exact_match"], "preference_accuracy": pref_sft["preference_accuracy"],
                 "preference_margin": pref_sft["margin"]})

    # ---------------------------------------------------------------------------------------------- DPO
    t0 = time.perf_counter()
    dpo_config = stage_config("dpo", dpo_steps, 2e-4, 16, str(sft_dir))
    dpo_config.data.seq_len = 96
    dpo_trainer = build_dpo(dpo_config, StageOptions(data="<built-in>", max_length=96, beta=0.1, val_fraction=0.0),
                            pairs=train_pairs, log=log)
    dpo = dpo_trainer.fit()
    timings["dpo"] = time.perf_counter() - t0
    dpo_model = SparrowForCausalLM.from_pretrained(out / "dpo" / "model").eval()
    em_dpo = exact_match(dpo_model, tok, chat_heldout, chat_template="sparrow")
    pref_dpo = preference_accuracy(held_pairs, policy=dpo_model, reference=model)
    implicit = preference_accuracy(held_pairs, policy=dpo_model, reference=sft_model)
    rows.append({"stage": "dpo", "loss": _loss_tail(dpo), "exact_match_chat": em_dpo["exact_match"],
                 "preference_accuracy": pref_dpo["preference_accuracy"], "preference_margin": pref_dpo["margin"],
                 "implicit_reward_accuracy": implicit["preference_accuracy"], "implicit_reward_margin": implicit["margin"]})

    # ----------------------------------------------------------------------------- samples and export
    from .generate import GenerationConfig, generate
    from .sft import render

    questions = [question_of(i) for i in heldout[:3]] + ["What is 23 plus 45?", "你好，请介绍一下你自己。"]
    stops = [t for t in (tok.token_to_id("<|end|>"), tok.token_to_id("<|endoftext|>")) if t is not None]
    prompts = [tok.encode(render([{"role": "user", "content": q}], add_generation_prompt=True), allowed_special="all")
               for q in questions]
    answers = generate(dpo_model, prompts, GenerationConfig(max_new_tokens=24, stop_ids=stops))
    samples = [{"question": q, "answer": tok.decode([t for t in a if t not in stops])} for q, a in zip(questions, answers)]
    export_hf(dpo_model, pre_dir, report / "hf_model", chat_template=TEMPLATES["sparrow"])
    for stage in ("pretrain", "sft", "dpo"):
        if (out / stage / "loss.png").is_file():
            shutil.copyfile(out / stage / "loss.png", report / f"loss_{stage}.png")
    timings["total"] = time.perf_counter() - start
    result = {"stages": rows, "samples": samples, "timings_s": timings,
              "exact_match_samples": {"pretrain": em_chat["samples"], "sft": em_sft["samples"], "dpo": em_dpo["samples"]}}
    (report / "metrics.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log("\n" + summary_table(rows))
    log("\nchat samples (DPO model, greedy):")
    for s in samples:
        log(f"  Q: {s['question']}\n  A: {s['answer']}")
    log(f"\nreport: {report} ({timings['total']:.0f}s)")
    return result


def summary_table(rows: list[dict[str, Any]]) -> str:
    columns = ["stage", "loss", "val_ppl", "exact_match_raw_prompt", "exact_match_chat", "preference_accuracy",
               "preference_margin", "implicit_reward_accuracy"]
    columns = [c for c in columns if any(c in r for r in rows)]

    def cell(value):
        if value is None:
            return "-"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    table = [columns] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
