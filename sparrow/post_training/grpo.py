"""GRPO (Shao et al., "DeepSeekMath", 2024) as an objective of the one Trainer, with verifiable rewards.

Each step, for every prompt of the batch, a group of ``G`` completions is sampled from the current policy (one
batched KV-cache generation over all prompts x G, :func:`sparrow.generate.generate`), scored by the rewards
(:mod:`.rewards`), and each completion's advantage is its reward against its group's:
``A = (r - mean_group) / (std_group + 1e-4)`` (``variant: dr_grpo``: no division by the std, Liu et al.,
"Understanding R1-Zero-Like Training", 2025). The loss per completion token is the clipped policy-ratio surrogate
plus, with ``beta > 0``, a KL penalty to a frozen reference by the k3 estimator (Schulman's
``exp(ref - logp) - (ref - logp) - 1``, unbiased and non-negative)::

    ratio = exp(logp - logp_old)
    l_t   = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * k3_t

``grpo`` averages l_t over each completion's tokens, then over completions; ``dr_grpo`` sums over tokens and
divides by a constant (completions x ``max_new_tokens``), so long wrong answers are not favoured by the per-sequence
mean. ``logp_old`` is the sampling policy's. With ``updates_per_batch: 1`` (TRL's ``num_iterations=1``) there is one
optimizer step per generation, so the ratio is 1 in value and the clip never acts; with ``K > 1`` the Trainer's
next ``K - 1`` steps reuse the same completions, advantages and ``logp_old`` (PPO's epochs over one rollout: the
prompt source hands those steps the same prompts), the policy has moved, and the ratio and its clip bound the
update. Checkpoints then fall on rollout boundaries (``train.save_every`` and ``train.max_steps`` multiples of
``K``), so a resumed run generates exactly what the uninterrupted one did. The rewards, pass@k and response
length are logged on the step that generates (once per rollout); the loss, KL and clip fraction on every step.

The sampling generator is seeded from ``(train.seed, first sample of the micro-batch)``, so a step's completions
are a pure function of the weights and the step: a resumed run samples exactly what the uninterrupted run sampled.
"""

from __future__ import annotations

import copy
import math
import os
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..data.builtin_corpus import TASKS, finetuning_items
from ..data.loading import iter_jsonl
from ..generate import GenerationConfig, generate
from ..model import IGNORE_INDEX
from ..tokenizer.chat import decode_answer, prompt_ids
from ..train.metrics import plot_curves, read_metrics
from .losses import pad_right, token_logprobs
from .rewards import exact_answer

VARIANTS = ("grpo", "dr_grpo")
REWARD_CURVE = "reward.png"


def group_advantages(rewards: Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """Per completion, its reward minus its group's mean, divided by the group's (unbiased) std plus ``eps``
    when ``scale``; ``rewards`` are grouped consecutively (prompt 0's G completions first)."""
    if rewards.numel() % group_size:
        raise ValueError(f"group_size: {rewards.numel()} rewards are not groups of {group_size}")
    r = rewards.view(-1, group_size).float()
    centred = r - r.mean(-1, keepdim=True)
    if scale:
        std = r.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1)


def grpo_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *, ref_logps: Tensor | None = None,
              beta: float = 0.0, epsilon: float = 0.2, variant: str = "grpo",
              max_new_tokens: int | None = None) -> tuple[Tensor, dict[str, float]]:
    """The clipped surrogate (+ ``beta`` x k3 KL) over completion tokens: ``logps``/``old_logps``/``ref_logps``/
    ``mask`` are (completions, positions), ``advantages`` (completions,). Metrics: mean KL and the share of
    tokens whose clip is active."""
    if variant not in VARIANTS:
        raise ValueError(f"variant: must be one of {VARIANTS}, got {variant!r}")
    if epsilon <= 0:
        raise ValueError(f"epsilon: must be positive, got {epsilon}")
    if beta < 0:
        raise ValueError(f"beta: must be >= 0, got {beta}")
    mask = mask.float()
    adv = advantages.unsqueeze(-1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    per_token = -torch.min(ratio * adv, clipped * adv)
    tokens = mask.sum().clamp(min=1)
    metrics: dict[str, float] = {}
    if beta > 0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps (the reference model's log-probs)")
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1
        per_token = per_token + beta * kl
        metrics["kl"] = float((kl.detach() * mask).sum() / tokens)
    active = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon) & (adv > 0))
    metrics["clip_fraction"] = float((active.float() * mask).sum() / tokens)
    if variant == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    else:
        if not max_new_tokens:
            raise ValueError("dr_grpo: max_new_tokens (the constant the token sum is divided by) is required")
        loss = (per_token * mask).sum() / (mask.shape[0] * max_new_tokens)
    return loss, metrics


def completion_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Right-padded ``prompt + completion`` ids and labels that are -100 except on the completion."""
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    labels = [[IGNORE_INDEX] * len(p) + list(c) for p, c in zip(prompts, completions)]
    return pad_right(rows, 0), pad_right(labels, IGNORE_INDEX)


# ------------------------------------------------------------------------------------------------ prompts

def builtin_prompts(seed: int = 0, num_people: int = 240, tasks: Sequence[str] | None = None) -> list[dict[str, str]]:
    """The built-in corpus's fine-tuning questions (never a held-out one) as ``{prompt, reference}``."""
    tasks = tuple(tasks or TASKS)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"tasks: unknown {unknown}; choose from {list(TASKS)}")
    return [{"prompt": i.question, "reference": i.answer} for i in finetuning_items(seed, num_people=num_people)
            if i.task in tasks]


def read_prompts(path: str | os.PathLike) -> list[dict[str, str]]:
    """``{"prompt": ..., "reference": ...}`` per line (``question``/``answer`` are accepted too)."""
    records = []
    for n, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        prompt, reference = row.get("prompt", row.get("question")), row.get("reference", row.get("answer"))
        if not isinstance(prompt, str) or not isinstance(reference, (str, int, float)):
            raise ValueError(f"{path}:{n}: needs a string 'prompt' and a 'reference'")
        records.append({"prompt": prompt, "reference": str(reference)})
    if not records:
        raise ValueError(f"{path}: no prompts")
    return records


class PromptSource:
    """The Trainer's batch source for GRPO: a micro-batch is prompts (encoded as a chat user turn) and their
    references, read in a seeded order reshuffled each epoch (a pure function of the sample index).

    With ``updates_per_batch = K > 1`` (and the Trainer's ``global_batch``, rows per step over all ranks), step
    ``t`` reads the prompts at the positions of step ``t // K`` of a single pass, so the ``K`` steps of a rollout
    read the same prompts; the batch's ``first_sample`` (which keys the rollout and seeds its sampling) is that
    position and ``update`` is ``t % K``."""

    def __init__(self, records: Sequence[dict[str, str]], tokenizer, *, template: str = "sparrow", seed: int = 0,
                 updates_per_batch: int = 1, global_batch: int | None = None):
        if not records:
            raise ValueError("prompts: need at least one")
        if updates_per_batch < 1:
            raise ValueError(f"updates_per_batch: must be >= 1, got {updates_per_batch}")
        if updates_per_batch > 1 and not global_batch:
            raise ValueError("global_batch: rows per step are needed to repeat a step's prompts (updates_per_batch > 1)")
        self.records = list(records)
        self.ids = [prompt_ids(tokenizer, r["prompt"], template) for r in self.records]
        self.seed = seed
        self.updates_per_batch, self.global_batch = updates_per_batch, global_batch or 1
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.records)))
            random.Random(f"sparrow-grpo-{self.seed}-{epoch}").shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def train_batch(self, first_sample: int, count: int) -> dict[str, Any]:
        step, offset = divmod(first_sample, self.global_batch)
        rollout, update = divmod(step, self.updates_per_batch)
        first_sample = rollout * self.global_batch + offset  # every prompt is read once per epoch, whatever K
        n = len(self.records)
        picks = [self._order(s // n)[s % n] for s in range(first_sample, first_sample + count)]
        return {"prompt_ids": [self.ids[i] for i in picks], "prompts": [self.records[i]["prompt"] for i in picks],
                "references": [self.records[i]["reference"] for i in picks], "first_sample": first_sample,
                "update": update}


# ---------------------------------------------------------------------------------------------- objective

class GRPOObjective:
    """GRPO for the Trainer on :class:`PromptSource` batches. ``reward`` scores one completion
    (``reward(prompt, completion, reference) -> float``, e.g. :class:`.rewards.WeightedRewards`);
    ``reference`` is the frozen model of the KL term (needed when ``beta > 0``)."""

    def __init__(self, tokenizer, reward: Callable[[str, str, str], float], *, reference: nn.Module | None = None,
                 group_size: int = 8, max_new_tokens: int = 8, temperature: float = 1.0, top_k: int = 0,
                 epsilon: float = 0.2, beta: float = 0.0, variant: str = "grpo", seed: int = 0,
                 updates_per_batch: int = 1):
        if group_size < 2:
            raise ValueError(f"group_size: must be >= 2 (advantages compare samples of one prompt), got {group_size}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
        if temperature <= 0:
            raise ValueError(f"temperature: must be > 0 (greedy samples of a group would all be equal), got {temperature}")
        if variant not in VARIANTS:
            raise ValueError(f"variant: must be one of {VARIANTS}, got {variant!r}")
        if beta > 0 and reference is None:
            raise ValueError("beta > 0 needs a reference model")
        if updates_per_batch < 1:
            raise ValueError(f"updates_per_batch: must be >= 1, got {updates_per_batch}")
        self.updates_per_batch = updates_per_batch
        self._rollouts: dict[int, dict[str, Any]] = {}  # first_sample -> a rollout still to be reused
        self.tokenizer, self.reward, self.reference = tokenizer, reward, reference
        if reference is not None:
            reference.eval().requires_grad_(False)
        self.group_size, self.epsilon, self.beta, self.variant, self.seed = group_size, epsilon, beta, variant, seed
        self.generation = GenerationConfig.for_tokenizer(tokenizer, max_new_tokens=max_new_tokens,
                                                         temperature=temperature, top_k=top_k)

    @classmethod
    def with_reference_copy(cls, policy: nn.Module, tokenizer, reward, **kwargs: Any) -> "GRPOObjective":
        return cls(tokenizer, reward, reference=copy.deepcopy(policy) if kwargs.get("beta", 0.0) > 0 else None, **kwargs)

    def sample(self, model: nn.Module, prompts: Sequence[Sequence[int]], first_sample: int) -> list[list[int]]:
        """``group_size`` completions per prompt (consecutive), in one batched generation."""
        raw = getattr(model, "module", model)  # DDP's wrapped model: generation needs no gradient sync
        was_training = raw.training
        raw.eval()
        try:
            seed = (self.seed * 1_000_003 + first_sample) % (2 ** 63)
            config = GenerationConfig(**{**self.generation.__dict__, "seed": seed})
            rows = [p for p in prompts for _ in range(self.group_size)]
            return generate(raw, rows, config)
        finally:
            raw.train(was_training)

    def rollout(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """Completions of the batch's prompts from the current policy, their rewards, advantages, the padded
        ``prompt + completion`` ids and labels, the reference's log-probs (``beta > 0``) and the metrics of the
        samples."""
        prompts, G = batch["prompt_ids"], self.group_size
        completions = self.sample(model, prompts, int(batch["first_sample"]))
        texts = [decode_answer(self.tokenizer, c) for c in completions]
        questions = [q for q in batch["prompts"] for _ in range(G)]
        references = [r for r in batch["references"] for _ in range(G)]
        rewards = torch.tensor([float(self.reward(q, t, r)) for q, t, r in zip(questions, texts, references)])
        correct = torch.tensor([exact_answer(q, t, r) for q, t, r in zip(questions, texts, references)])
        device = next(model.parameters()).device
        ids, labels = completion_batch([p for p in prompts for _ in range(G)], completions)
        ids, labels = ids.to(device), labels.to(device)
        ref_logps = None
        if self.beta > 0:
            with torch.no_grad():
                ref_logps, _ = token_logprobs(self.reference(ids).logits, labels)
        metrics = {"reward_mean": float(rewards.mean()), "reward_max": float(rewards.max()),
                   "exact_mean": float(correct.mean()),
                   f"pass@{G}": float((correct.view(-1, G).max(-1).values > 0).float().mean()),
                   "response_length": float(sum(len(c) for c in completions) / len(completions))}
        return {"ids": ids, "labels": labels, "ref_logps": ref_logps, "metrics": metrics,
                "advantages": group_advantages(rewards, G, scale=self.variant == "grpo").to(device)}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        key, update = int(batch["first_sample"]), int(batch.get("update", 0))
        if update == 0:
            rollout = self.rollout(model, batch)
        elif key in self._rollouts:
            rollout = self._rollouts[key]
        else:
            raise RuntimeError(f"grpo.updates_per_batch: update {update} of the rollout at sample {key} has no rollout "
                               f"in memory (a run resumed inside a rollout's {self.updates_per_batch} updates; "
                               f"train.save_every and train.max_steps must be multiples of it)")
        logps, mask = token_logprobs(model(rollout["ids"]).logits, rollout["labels"])
        if update == 0:  # the sampling policy's log-probs, kept for the rollout's later updates
            rollout["old_logps"] = logps.detach()
            if self.updates_per_batch > 1:
                self._rollouts[key] = rollout
        if update == self.updates_per_batch - 1:
            self._rollouts.pop(key, None)
        loss, metrics = grpo_loss(logps, rollout["old_logps"], rollout["advantages"], mask,
                                  ref_logps=rollout["ref_logps"], beta=self.beta, epsilon=self.epsilon,
                                  variant=self.variant, max_new_tokens=self.generation.max_new_tokens)
        if update == 0:
            metrics.update(rollout["metrics"])
        return loss, metrics

    def weight(self, batch: dict[str, Any]) -> float:
        return float(len(batch["prompt_ids"]))

    def plot(self, metrics_path: Path, out_dir: Path) -> Path:
        return plot_rewards(metrics_path, out_dir / REWARD_CURVE, title=out_dir.name)


def plot_rewards(metrics_path: str | os.PathLike, out_png: str | os.PathLike, *, title: str = "GRPO") -> Path:
    """Mean reward, exact-answer rate and the group's pass@k per step (drawn beside the loss curve)."""
    records = [r for r in read_metrics(metrics_path) if "reward_mean" in r]
    keys = ["reward_mean", "exact_mean"] + sorted({k for r in records for k in r if k.startswith("pass@")})
    curves = {k: [(r["step"], r[k]) for r in records if k in r and math.isfinite(r[k])] for k in keys}
    return plot_curves(curves, out_png, ylabel="reward / rate", title=title)
