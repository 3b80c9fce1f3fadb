"""Evaluation: perplexity on held-out text, exact-match accuracy on held-out question/answer items, and
preference accuracy on held-out pairs (the implicit DPO reward against a reference, or a reward model).

:func:`evaluate` is the one entry point of ``sparrow eval`` and the demo, on the held-out items of
:func:`heldout_sample`, so the two print the same figures for the same model.
"""

from __future__ import annotations

import math
import random
import re
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..data.builtin_corpus import TASKS, EvalItem, answer_has_the_asked_type, eval_items
from ..generate import GenerationConfig, generate
from ..model import IGNORE_INDEX, SparrowForCausalLM
from ..tokenizer.chat import END_OF_TURN, EOT, decode_answer, encode_text, prompt_ids
from .losses import pad_right, sequence_logprobs
from .reward_model import RewardModel


def heldout_sample(seed: int, per_task: int, num_people: int = 240) -> list[EvalItem]:
    """``per_task`` held-out items of each task of the built-in corpus whose world is (``seed``,
    ``num_people``), drawn with ``seed``, so each task weighs the same."""
    rng = random.Random(f"sparrow-demo-eval-{seed}")
    items = eval_items(seed, split="heldout", num_people=num_people)
    sample = []
    for task in TASKS:
        group = [i for i in items if i.task == task]
        sample += rng.sample(group, min(per_task, len(group)))
    return sample


@torch.no_grad()
def perplexity(model: SparrowForCausalLM, rows: Sequence[Sequence[int]], *, batch_size: int = 8) -> float:
    """exp of the mean next-token loss over every predicted token of ``rows`` (token-weighted, not per row);
    rows longer than the context are cut into windows."""
    limit = model.config.max_position_embeddings
    windows = [list(r[i:i + limit]) for r in rows for i in range(0, max(len(r) - 1, 1), limit - 1)]
    windows = [w for w in windows if len(w) > 1]
    if not windows:
        raise ValueError("rows: need at least one row of two or more tokens")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        ids = pad_right(chunk, 0).to(device)
        labels = pad_right(chunk, IGNORE_INDEX).to(device)
        logits = model(ids).logits[:, :-1].float()
        targets = labels[:, 1:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                       ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((targets != IGNORE_INDEX).sum())
    return math.exp(total / count)


_ANSWER_END = re.compile("|".join([r"[.。\n]", re.escape(END_OF_TURN), re.escape(EOT)]))


def extract_answer(text: str) -> str:
    """The answer part of a generation: up to the first sentence end, newline or end token, stripped."""
    return _ANSWER_END.split(text, maxsplit=1)[0].strip()


def answer_matches(generated: str, expected: str) -> bool:
    """Whether a generation's answer (:func:`extract_answer`) is exactly the expected one: exact match's rule,
    shared with GRPO's exact-answer reward."""
    return extract_answer(generated) == expected.strip()


def exact_match(model: SparrowForCausalLM, tokenizer, items, *, chat_template: str | None = None,
                max_new_tokens: int = 16, batch_size: int = 16) -> dict:
    """Fraction of ``items`` (with ``prompt`` and ``answer``) whose greedy answer equals the expected one.

    ``chat_template=None`` continues the raw prompt (a pretrained model); a template name ("sparrow", "qa")
    asks the item's ``question`` (its ``prompt`` if it has none) as a user turn and stops at the end-of-turn
    token (a chat model). Items with a ``task`` (:class:`sparrow.data.EvalItem`) are also scored per task.
    """
    prompts = [encode_text(tokenizer, item.prompt) if chat_template is None else
               prompt_ids(tokenizer, getattr(item, "question", None) or item.prompt, chat_template) for item in items]
    config = GenerationConfig.for_tokenizer(tokenizer, max_new_tokens=max_new_tokens)
    answers = []
    for start in range(0, len(prompts), batch_size):
        for out in generate(model, prompts[start:start + batch_size], config):
            answers.append(decode_answer(tokenizer, out))
    correct = [answer_matches(a, item.answer) for a, item in zip(answers, items)]
    answers = [extract_answer(a) for a in answers]
    by_task: dict[str, list[bool]] = {}
    for item, ok in zip(items, correct):
        if getattr(item, "task", None):
            by_task.setdefault(item.task, []).append(ok)
    return {"exact_match": sum(correct) / max(len(items), 1), "n": len(items), "correct": correct, "answers": answers,
            "by_task": {task: sum(oks) / len(oks) for task, oks in by_task.items()},
            "samples": [{"prompt": i.prompt, "expected": i.answer, "got": a} for i, a in list(zip(items, answers))[:5]]}


@torch.no_grad()
def preference_accuracy(pairs: dict[str, torch.Tensor], *, policy: SparrowForCausalLM | None = None,
                        reference: SparrowForCausalLM | None = None, reward_model: RewardModel | None = None,
                        beta: float = 0.1, batch_size: int = 16) -> dict:
    """Share of pairs whose chosen answer scores higher, and the mean margin.

    With ``policy`` and ``reference``: the implicit DPO reward ``beta * (log pi - log ref)``; with ``policy``
    alone, ``beta * log pi`` (reference-free, so models that share no reference compare); ``pairs`` holds
    ``chosen_input_ids``/``chosen_labels``/``rejected_input_ids``/``rejected_labels``. With ``reward_model``:
    its score; ``pairs`` then holds ``*_input_ids`` and ``*_lengths``.
    """
    n = pairs["chosen_input_ids"].shape[0]
    margins = []
    for start in range(0, n, batch_size):
        part = {k: v[start:start + batch_size] for k, v in pairs.items()}
        if reward_model is not None:
            margin = (reward_model(part["chosen_input_ids"], part["chosen_lengths"])
                      - reward_model(part["rejected_input_ids"], part["rejected_lengths"]))
        elif policy is not None:
            def reward(side):
                logps = sequence_logprobs(policy(part[f"{side}_input_ids"]).logits, part[f"{side}_labels"])
                if reference is not None:
                    logps = logps - sequence_logprobs(reference(part[f"{side}_input_ids"]).logits, part[f"{side}_labels"])
                return beta * logps
            margin = reward("chosen") - reward("rejected")
        else:
            raise ValueError("preference_accuracy: pass policy (and optionally reference), or reward_model")
        margins.append(margin.float())
    margin = torch.cat(margins)
    return {"preference_accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean()), "n": n}


def typed_answer_rate(items: Sequence[EvalItem], answers: Sequence[str], seed: int, num_people: int = 240) -> float:
    """Share of answers that are a value of the asked kind (right or wrong): the format half of exact match."""
    typed = [answer_has_the_asked_type(i, a, seed, num_people) for i, a in zip(items, answers)]
    return sum(typed) / max(len(typed), 1)


def evaluate(model: SparrowForCausalLM, tokenizer, items: Sequence[EvalItem], *, template: str | None = "sparrow",
             world: tuple[int, int] | None = None, texts: Sequence[str] | None = None,
             pairs: dict[str, torch.Tensor] | None = None, reference: SparrowForCausalLM | None = None,
             reward_model: RewardModel | None = None) -> dict[str, Any]:
    """Every figure Sparrow reports for a model, in this order: exact match on ``items`` (asked with the chat
    ``template``, or as raw prompts with ``None``), per task, and with the built-in corpus's ``world``
    (seed, number of people) the share of answers of the asked type; perplexity on ``texts``; preference
    accuracy and margin on encoded held-out ``pairs`` (against ``reference``, or scored by ``reward_model``).
    The parts whose inputs are not given are left out."""
    em = exact_match(model, tokenizer, items, chat_template=template)
    result: dict[str, Any] = {"exact_match": em["exact_match"], "by_task": em["by_task"], "n": em["n"],
                              "answers": em["answers"], "samples": em["samples"]}
    if world is not None:
        result["typed_answer"] = typed_answer_rate(items, em["answers"], *world)
    if texts is not None:
        result["perplexity"] = perplexity(model, [tokenizer.encode(t) for t in texts])
    if pairs is not None:
        result["preference"] = (preference_accuracy(pairs, reward_model=reward_model) if reward_model is not None
                                else preference_accuracy(pairs, policy=model, reference=reference))
    return result
