"""``sparrow demo``: the whole chain on the built-in data, on a CPU, with no downloads.

clean the built-in corpus -> train a tokenizer -> pretrain a tiny model -> SFT on chat-formatted questions ->
preference pairs (an early SFT checkpoint's sampled answers rejected against the reference answers) -> DPO ->
evaluation after each stage on held-out items -> a few chat samples -> an exported Hugging Face folder.

``typed_answer_chat`` is the share of answers that are a value of the asked kind, right or wrong (a city for a
city question): the format half of exact match, which a model this small learns long before the answers.

Held out throughout: exact-match questions never asked in training, the same number from each task of
:func:`sparrow.data.eval_items` (``facts``: closed-book questions about people described only in prose;
``arithmetic``: operand pairs never stated; ``reading``: passages about people who never occur in training), and
preference pairs built from those questions. Preference accuracy and margin are the implicit reward
``beta * (log pi - log pi_pretrained)`` of chosen over rejected, so SFT and DPO are scored against the same
reference; the DPO row adds the reward against its own reference (the SFT model).

The claims the demo exists to show are checked at the end (:func:`learning_checks`): SFT raises exact match over
the pretrained model; DPO raises preference accuracy and margin over SFT without lowering exact match. The report
folder holds metrics.json (every figure, per-task exact match, the checks, timings), each stage's loss curve, the
SFT data and preference pairs (for ``configs/sft_tiny.yaml`` and ``configs/dpo_tiny.yaml``) and the exported model.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

from .data.builtin_corpus import TASKS, EvalItem, answer_has_the_asked_type, chat_record, eval_items, finetuning_items
from .evaluate import exact_match, preference_accuracy
from .model import SparrowForCausalLM


def heldout_sample(seed: int, per_task: int, num_people: int = 240) -> list[EvalItem]:
    """``per_task`` held-out items of each task, drawn with ``seed``, so each task weighs the same."""
    rng = random.Random(f"sparrow-demo-eval-{seed}")
    items = eval_items(seed, split="heldout", num_people=num_people)
    sample = []
    for task in TASKS:
        group = [i for i in items if i.task == task]
        sample += rng.sample(group, min(per_task, len(group)))
    return sample


def typed_answer_rate(items: list[EvalItem], result: dict, seed: int) -> float:
    """Share of answers that are a value of the asked kind (right or wrong): the format half of exact match."""
    typed = [answer_has_the_asked_type(i, a, seed) for i, a in zip(items, result["answers"])]
    return sum(typed) / max(len(typed), 1)


def learning_checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The demo's claims, each with the figures it compares: SFT raises exact match over the pretrained model
    (either way of prompting it); DPO raises preference accuracy and margin over SFT and keeps exact match."""
    stage = {r["stage"]: r for r in rows}
    pre, sft, dpo = stage["pretrain"], stage["sft"], stage["dpo"]
    pre_em = max(pre["exact_match_raw_prompt"], pre["exact_match_chat"])
    checks = [
        ("SFT raises exact match over the pretrained model", sft["exact_match_chat"] > pre_em,
         f"{pre_em:.3f} -> {sft['exact_match_chat']:.3f}"),
        ("DPO raises preference accuracy over SFT", dpo["preference_accuracy"] > sft["preference_accuracy"],
         f"{sft['preference_accuracy']:.3f} -> {dpo['preference_accuracy']:.3f}"),
        ("DPO raises the chosen-rejected margin over SFT", dpo["preference_margin"] > sft["preference_margin"],
         f"{sft['preference_margin']:.3f} -> {dpo['preference_margin']:.3f}"),
        ("DPO does not lower exact match", dpo["exact_match_chat"] >= sft["exact_match_chat"],
         f"{sft['exact_match_chat']:.3f} -> {dpo['exact_match_chat']:.3f}"),
    ]
    return [{"claim": claim, "passed": bool(ok), "figures": figures} for claim, ok, figures in checks]


def _loss_tail(result) -> float:
    tail = list(result.losses.values())[-10:]
    return sum(tail) / len(tail) if tail else float("nan")


def _write_jsonl(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def run_demo(out: str | Path = "runs/demo", *, pretrain_steps: int = 240, sft_steps: int = 300, dpo_steps: int = 60,
             eval_per_task: int = 100, seed: int = 0, cache_dir: str | Path = "runs/cache",
             overrides: dict[str, Any] | None = None, log=print) -> dict[str, Any]:
    """The whole chain; returns (and writes to ``<out>/report/metrics.json``) every figure and the checks.
    ``overrides`` are dotted config keys for the pretraining run (``{"data.builtin_python_docs": False}``)."""
    from .train.builtin_data import prepare_builtin
    from .export import export_hf
    from .preference import PreferenceDataset, build_pairs
    from .sft import TEMPLATES
    from .stages import StageOptions, build_dpo, build_sft
    from .tokenizer import Tokenizer
    from .train import build_pretraining
    from .train.checkpoint import list_checkpoints
    from .train.config import Config, set_key

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
        c.data.cache_dir = str(cache_dir)  # the built-in corpus's tokenizer and tokens, shared with `sparrow pretrain`
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

    # ------------------------------------------------------------------------------ clean + tokenizer
    t0 = time.perf_counter()
    config = stage_config("pretrain", pretrain_steps, 3e-3, 8, None)
    for key, value in (overrides or {}).items():
        set_key(config, key, value)
    d = config.data
    prepared = prepare_builtin(d.cache_dir, vocab_size=config.model.model_config().vocab_size, seed=d.builtin_seed,
                               python_docs=d.builtin_python_docs, arithmetic_docs=d.builtin_arithmetic_docs,
                               num_people=d.builtin_num_people, reading_docs=d.builtin_reading_docs, log=log)
    timings["clean_and_tokenize"] = time.perf_counter() - t0

    # ----------------------------------------------------------------------------------------- pretrain
    t0 = time.perf_counter()
    pre = build_pretraining(config, log=log).fit()
    timings["pretrain"] = time.perf_counter() - t0
    pre_dir = out / "pretrain" / "model"
    tok = Tokenizer.from_file(pre_dir / "tokenizer.json")
    model = SparrowForCausalLM.from_pretrained(pre_dir).eval()
    # The corpus's world (its seed and size) is what the questions must be about.
    heldout = heldout_sample(d.builtin_seed, eval_per_task, d.builtin_num_people)
    t0 = time.perf_counter()
    em_raw = exact_match(model, tok, heldout)
    em_pre = exact_match(model, tok, heldout, chat_template="sparrow")
    timings["eval_pretrain"] = time.perf_counter() - t0
    rows.append({"stage": "pretrain", "loss": _loss_tail(pre), "val_ppl": math.exp(pre.val_loss) if pre.val_loss else None,
                 "exact_match_raw_prompt": em_raw["exact_match"], "exact_match_chat": em_pre["exact_match"],
                 "typed_answer_chat": typed_answer_rate(heldout, em_pre, d.builtin_seed)})
    log(f"pretrain: exact match {em_raw['exact_match']:.3f} (raw prompt), {em_pre['exact_match']:.3f} (chat)")

    # ---------------------------------------------------------------------------------------------- SFT
    t0 = time.perf_counter()
    train_items = finetuning_items(d.builtin_seed, num_people=d.builtin_num_people)
    records = [chat_record(i) for i in train_items]
    _write_jsonl(records, report / "sft_train.jsonl")
    sft_config = stage_config("sft", sft_steps, 1e-3, 16, str(pre_dir))
    sft_config.data.seq_len = 192  # reading passages are the longest conversations (~150 tokens)
    sft_config.train.save_every = max(1, sft_steps // 4)  # the first checkpoint is the weak model DPO rejects
    sft_config.train.keep_checkpoints = 8
    sft = build_sft(sft_config, StageOptions(data="<built-in>", max_length=192), records=records, log=log).fit()
    timings["sft"] = time.perf_counter() - t0
    sft_dir = out / "sft" / "model"
    sft_model = SparrowForCausalLM.from_pretrained(sft_dir).eval()
    t0 = time.perf_counter()
    em_sft = exact_match(sft_model, tok, heldout, chat_template="sparrow")
    timings["eval_sft"] = time.perf_counter() - t0
    log(f"sft: exact match {em_sft['exact_match']:.3f} (chat)")

    # ------------------------------------------------------------------------------- preference pairs
    t0 = time.perf_counter()
    weak = SparrowForCausalLM.from_pretrained(list_checkpoints(out / "sft")[0] / "model").eval()
    pair_items = random.Random(seed + 1).sample(train_items, min(len(train_items), 800))
    # Answers are a few tokens; a short budget keeps rejected samples comparable in length to them.
    train_pairs = build_pairs(weak, tok, [(i.question, i.answer) for i in pair_items], temperature=1.0,
                              max_new_tokens=8, seed=seed)
    val_pairs = build_pairs(weak, tok, [(i.question, i.answer) for i in heldout], temperature=1.0,
                            max_new_tokens=8, seed=seed + 1)
    _write_jsonl(train_pairs, report / "pairs_train.jsonl")
    _write_jsonl(val_pairs, report / "pairs_heldout.jsonl")
    timings["pairs"] = time.perf_counter() - t0
    log(f"preference pairs: {len(train_pairs)} for training, {len(val_pairs)} held out")
    held_pairs = PreferenceDataset(val_pairs, tok, max_length=192, val_pairs=val_pairs).all_pairs("val")
    # Rewards relative to the pretrained model, a reference shared by both stages: a summed log-prob alone
    # would mostly measure length (the weak model's rejected samples are longer than the reference answers).
    pref_sft = preference_accuracy(held_pairs, policy=sft_model, reference=model)
    rows.append({"stage": "sft", "loss": _loss_tail(sft), "val_ppl": math.exp(sft.val_loss) if sft.val_loss else None,
                 "exact_match_chat": em_sft["exact_match"],
                 "typed_answer_chat": typed_answer_rate(heldout, em_sft, d.builtin_seed),
                 "preference_accuracy": pref_sft["preference_accuracy"],
                 "preference_margin": pref_sft["margin"]})

    # ---------------------------------------------------------------------------------------------- DPO
    t0 = time.perf_counter()
    dpo_config = stage_config("dpo", dpo_steps, 2e-4, 16, str(sft_dir))
    dpo_config.data.seq_len = 192
    # rpo_alpha keeps the chosen (correct) answers' likelihood up while DPO pushes the rejected ones down;
    # plain DPO lowers both and, on a model this small, costs exact match.
    dpo_options = StageOptions(data="<built-in>", max_length=192, beta=0.1, rpo_alpha=1.0, val_fraction=0.0)
    dpo = build_dpo(dpo_config, dpo_options, pairs=train_pairs, log=log).fit()
    timings["dpo"] = time.perf_counter() - t0
    dpo_model = SparrowForCausalLM.from_pretrained(out / "dpo" / "model").eval()
    t0 = time.perf_counter()
    em_dpo = exact_match(dpo_model, tok, heldout, chat_template="sparrow")
    pref_dpo = preference_accuracy(held_pairs, policy=dpo_model, reference=model)
    implicit = preference_accuracy(held_pairs, policy=dpo_model, reference=sft_model)
    timings["eval_dpo"] = time.perf_counter() - t0
    rows.append({"stage": "dpo", "loss": _loss_tail(dpo), "exact_match_chat": em_dpo["exact_match"],
                 "typed_answer_chat": typed_answer_rate(heldout, em_dpo, d.builtin_seed),
                 "preference_accuracy": pref_dpo["preference_accuracy"], "preference_margin": pref_dpo["margin"],
                 "implicit_reward_accuracy": implicit["preference_accuracy"], "implicit_reward_margin": implicit["margin"]})

    # ----------------------------------------------------------------------------- samples and export
    from .generate import GenerationConfig, generate
    from .sft import render

    by_task = {task: [i for i in heldout if i.task == task][0] for task in TASKS}
    questions = [i.question for i in by_task.values()] + ["What is 23 plus 45?", "你好，请介绍一下你自己。"]
    stops = [t for t in (tok.token_to_id("<|end|>"), tok.token_to_id("<|endoftext|>")) if t is not None]
    prompts = [tok.encode(render([{"role": "user", "content": q}], add_generation_prompt=True), allowed_special="all")
               for q in questions]
    answers = generate(dpo_model, prompts, GenerationConfig(max_new_tokens=24, stop_ids=stops,
                                                                        vocab_limit=tok.vocab_size))
    samples = [{"question": q, "answer": tok.decode([t for t in a if t not in stops])} for q, a in zip(questions, answers)]
    export_hf(dpo_model, pre_dir, report / "hf_model", chat_template=TEMPLATES["sparrow"])
    for stage in ("pretrain", "sft", "dpo"):
        if (out / stage / "loss.png").is_file():
            shutil.copyfile(out / stage / "loss.png", report / f"loss_{stage}.png")
    timings["total"] = time.perf_counter() - start
    checks = learning_checks(rows)
    per_task = {"pretrain_raw_prompt": em_raw["by_task"], "pretrain_chat": em_pre["by_task"], "sft": em_sft["by_task"],
                "dpo": em_dpo["by_task"]}
    result = {"stages": rows, "exact_match_by_task": per_task, "checks": checks, "samples": samples,
              "cleaning": prepared.cleaning, "eval_items_per_task": eval_per_task,
              "preference_pairs": {"train": len(train_pairs), "heldout": len(val_pairs)}, "timings_s": timings,
              "exact_match_samples": {"pretrain": em_pre["samples"], "sft": em_sft["samples"], "dpo": em_dpo["samples"]}}
    (report / "metrics.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log("\n" + summary_table(rows))
    log("\nexact match by task (held out, " + f"{eval_per_task} items each):\n" + task_table(per_task))
    log("\nchecks:")
    for c in checks:
        log(f"  [{'pass' if c['passed'] else 'FAIL'}] {c['claim']}: {c['figures']}")
    log("\nchat samples (DPO model, greedy):")
    for s in samples:
        log(f"  Q: {s['question']}\n  A: {s['answer']}")
    log(f"\nreport: {report} ({timings['total']:.0f}s)")
    return result


def _table(header: list[str], body: list[list[str]]) -> str:
    table = [header] + body
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def summary_table(rows: list[dict[str, Any]]) -> str:
    columns = ["stage", "loss", "val_ppl", "exact_match_raw_prompt", "exact_match_chat", "typed_answer_chat",
               "preference_accuracy", "preference_margin", "implicit_reward_accuracy"]
    columns = [c for c in columns if any(c in r for r in rows)]
    return _table(columns, [[_cell(r.get(c)) for c in columns] for r in rows])


def task_table(per_task: dict[str, dict[str, float]]) -> str:
    return _table(["model"] + list(TASKS), [[name] + [_cell(v.get(t)) for t in TASKS] for name, v in per_task.items()])
