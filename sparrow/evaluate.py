"""Evaluation: perplexity on held-out text, exact-match accuracy on held-out question/answer items, and
preference accuracy on held-out pairs (the implicit DPO reward against a reference, or a reward model)."""

from __future__ import annotations

import math
import re
from typing import Sequence

import torch
import torch.nn.functional as F

from .align import IGNORE_INDEX, RewardModel, pad_right, sequence_logprobs
from .generate import GenerationConfig, generate
from .model import SparrowForCausalLM
from .sft import render


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


_ANSWER_END = re.compile(r"[.。\n]|<\|end\|>|<\|endoftext\|>")


def extract_answer(text: str) -> str:
    """The answer part of a generation: up to the first sentence end, newline or end token, stripped."""
    return _ANSWER_END.split(text, maxsplit=1)[0].strip()


def exact_match(model: SparrowForCausalLM, tokenizer, items, *, chat_template: str | None = None,
                max_new_tokens: int = 16, batch_size: int = 16) -> dict:
    """Fraction of ``items`` (with ``prompt`` and ``answer``) whose greedy answer equals the expected one.

    ``chat_template=None`` continues the raw prompt (a pretrained model); a template name ("sparrow", "qa")
    asks the item's ``question`` (its ``prompt`` if it has none) as a user turn and stops at the end-of-turn
    token (a chat model). Items with a ``task`` (:class:`sparrow.data.EvalItem`) are also scored per task.
    """
    stops = [t for t in (tokenizer.token_to_id("<|end|>"), tokenizer.token_to_id("<|endoftext|>")) if t is not None]
    prompts = []
    for item in items:
        if chat_template is None:
            text = item.prompt
        else:
            user = getattr(item, "question", None) or item.prompt
            text = render([{"role": "user", "content": user}], chat_template, add_generation_prompt=True)
        prompts.append(tokenizer.encode(text, allowed_special="all"))
    config = GenerationConfig(max_new_tokens=max_new_tokens, stop_ids=stops, vocab_limit=getattr(tokenizer, "vocab_size", None))
    answers = []
    for start in range(0, len(prompts), batch_size):
        for out in generate(model, prompts[start:start + batch_size], config):
            answers.append(extract_answer(tokenizer.decode([t for t in out if t not in stops])))
    correct = [a == item.answer.strip() for a, item in zip(answers, items)]
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
