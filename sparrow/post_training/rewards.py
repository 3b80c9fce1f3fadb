"""Verifiable rewards for GRPO: each is a Python callable ``reward(prompt, completion, reference) -> float`` on
text (the question, the decoded completion without its stop token, the expected answer).

Built in, by name (:data:`REWARDS`):

``exact``
    1 when the completion's answer is the reference, by exact match's own rule
    (:func:`sparrow.post_training.evaluation.answer_matches`), else 0: arithmetic, facts and reading alike.
``format``
    1 when the completion is one bare answer (nothing after it but a full stop) and, for a numeric reference,
    an integer; else 0. Right or wrong: the format half of the answer.
``arithmetic``
    Partial credit for numeric answers, dense where ``exact`` is a needle in a haystack for a model that rarely
    gets a sum right: 0.25 for an integer answer, 0.25 for the right sign, 0.25 for the right number of digits
    and 0.25 times the share of digits right (aligned from the units), so 1 exactly when the answer is right.
    A non-numeric reference falls back to ``exact``. Its credit for form (integer, sign, length) is paid to any
    guess, so a policy can raise it without answering any better.
``closeness``
    Partial credit only for being near: 1 for the exact answer, else ``0.5 * max(0, 1 - |answer - reference| /
    max(|reference|, 10))`` for an integer answer and 0 otherwise. No credit for form, so a fixed guess earns
    little and nothing within a group (advantages compare one prompt's samples); the credit grows as the
    answer's magnitude (its leading digits) comes right. A non-numeric reference falls back to ``exact``.

Anything else is ``module:function`` (imported), so a YAML can name its own reward.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable, Sequence

from .evaluation import answer_matches, extract_answer

RewardFn = Callable[[str, str, str], float]

_INTEGER = re.compile(r"-?\d+")


def exact_answer(prompt: str, completion: str, reference: str) -> float:
    return 1.0 if answer_matches(completion, reference) else 0.0


def format_reward(prompt: str, completion: str, reference: str) -> float:
    answer = extract_answer(completion)
    if not answer or completion.strip().rstrip(".。").strip() != answer:
        return 0.0
    if _INTEGER.fullmatch(reference.strip()) and not _INTEGER.fullmatch(answer):
        return 0.0
    return 1.0


def _integer_reward(score: Callable[[str, str], float]) -> RewardFn:
    """A reward for integer references from ``score(answer, reference)`` on the completion's integer answer: a
    non-integer reference falls back to ``exact`` (facts and reading questions), a non-integer answer earns 0."""

    def reward(prompt: str, completion: str, reference: str) -> float:
        reference = reference.strip()
        if not _INTEGER.fullmatch(reference):
            return exact_answer(prompt, completion, reference)
        answer = extract_answer(completion)
        if not _INTEGER.fullmatch(answer):
            return 0.0
        return score(answer, reference)

    reward.__name__ = reward.__qualname__ = score.__name__
    reward.__doc__ = score.__doc__
    return reward


@_integer_reward
def arithmetic_partial(answer: str, reference: str) -> float:
    got, want = answer.lstrip("-"), reference.lstrip("-")
    sign = answer.startswith("-") == reference.startswith("-")
    digits = sum(a == b for a, b in zip(reversed(got), reversed(want))) / len(want)
    return 0.25 + 0.25 * sign + 0.25 * (len(got) == len(want)) + 0.25 * digits


@_integer_reward
def arithmetic_closeness(answer: str, reference: str) -> float:
    got, want = int(answer), int(reference)
    if got == want:
        return 1.0
    return 0.5 * max(0.0, 1.0 - abs(got - want) / max(abs(want), 10))


REWARDS: dict[str, RewardFn] = {"exact": exact_answer, "format": format_reward, "arithmetic": arithmetic_partial,
                                "closeness": arithmetic_closeness}


def resolve_reward(name: str) -> RewardFn:
    """A built-in reward by name, or ``module:function``."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise ValueError(f"rewards: unknown reward {name!r}; built in are {sorted(REWARDS)}, or name a "
                         f"Python callable as module:function")
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"rewards: cannot import {name!r}: {exc}") from exc
    if not callable(fn):
        raise ValueError(f"rewards: {name!r} is not callable")
    return fn


class WeightedRewards:
    """The weighted sum of several rewards. ``spec`` is a list of names (weight 1 each) or of
    ``{name: ..., weight: ...}`` mappings, or a ``{name: weight}`` mapping."""

    def __init__(self, spec: Sequence | dict):
        if isinstance(spec, str):
            spec = [spec]
        if isinstance(spec, dict):
            spec = [{"name": k, "weight": v} for k, v in spec.items()]
        parts = []
        for entry in spec:
            name, weight = (entry, 1.0) if isinstance(entry, str) else (entry.get("name"), entry.get("weight", 1.0))
            if not isinstance(name, str):
                raise ValueError(f"rewards: each entry needs a name, got {entry!r}")
            parts.append((name, resolve_reward(name), float(weight)))
        if not parts:
            raise ValueError("rewards: need at least one reward")
        self.parts = parts

    def __call__(self, prompt: str, completion: str, reference: str) -> float:
        return sum(w * float(fn(prompt, completion, reference)) for _, fn, w in self.parts)

    def describe(self) -> str:
        return " + ".join(f"{w:g} {name}" for name, _, w in self.parts)
