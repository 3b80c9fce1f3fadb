"""Post-training losses: sequence log-probabilities, DPO (sigmoid with conservative label smoothing, or IPO), the
Bradley-Terry loss of a reward model (:mod:`.reward_model`), and the objectives that plug them into
:class:`sparrow.train.Trainer`.

DPO follows Rafailov et al. and TRL's ``DPOTrainer`` exactly: with ``D = (pi_c - ref_c) - (pi_r - ref_r)`` (log-probs
summed over the response tokens), the sigmoid loss is ``-(1-e) logsig(b D) - e logsig(-b D)`` and IPO's is
``(D - 1/(2b))**2``; the implicit rewards are ``b (pi - ref)``. ``rpo_alpha`` adds TRL's RPO term (Pang et al.,
"Iterative Reasoning Preference Optimization"): ``alpha`` times the mean negative log-likelihood per chosen
response token, which keeps DPO from lowering the likelihood of the chosen answers along with the rejected ones.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model import IGNORE_INDEX


def token_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """log p(label_t | tokens < t) per position (0 where the label is -100) and the mask of labelled positions,
    both (batch, length - 1).

    ``labels`` are aligned with the inputs, as for the model's loss: the logits at t predict label t+1.
    """
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    token_logps = torch.gather(logits.log_softmax(-1), 2, safe.unsqueeze(-1)).squeeze(-1)
    return token_logps * mask, mask


def sequence_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum over positions whose label is not -100 of log p(label_t | tokens < t), per row."""
    return token_logprobs(logits, labels)[0].sum(-1)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = "sigmoid") -> tuple[Tensor, dict[str, float]]:
    """Mean DPO loss over pairs and per-batch metrics (rewards of chosen and rejected, reward accuracy, margin)."""
    if beta <= 0:
        raise ValueError(f"beta: must be positive, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing: must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    d = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * d) - label_smoothing * F.logsigmoid(-beta * d)
    elif loss_type == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing: not defined for the IPO loss")
        losses = (d - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type: must be 'sigmoid' or 'ipo', got {loss_type!r}")
    chosen_rewards = (beta * chosen_ratio).detach()
    rejected_rewards = (beta * rejected_ratio).detach()
    metrics = {
        "rewards/chosen": float(chosen_rewards.mean()),
        "rewards/rejected": float(rejected_rewards.mean()),
        "rewards/accuracy": float((chosen_rewards > rejected_rewards).float().mean()),
        "rewards/margin": float((chosen_rewards - rejected_rewards).mean()),
    }
    return losses.mean(), metrics


def pad_right(rows: list[list[int]], value: int) -> Tensor:
    longest = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (longest - len(r)) for r in rows], dtype=torch.long)


def pair_logprobs(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Summed response log-probs of chosen and rejected, in one forward over both (concatenated on the batch)."""
    chosen_ids, rejected_ids = batch["chosen_input_ids"], batch["rejected_input_ids"]
    width = max(chosen_ids.shape[1], rejected_ids.shape[1])
    ids = torch.cat([F.pad(chosen_ids, (0, width - chosen_ids.shape[1]), value=0),
                     F.pad(rejected_ids, (0, width - rejected_ids.shape[1]), value=0)])
    labels = torch.cat([F.pad(batch["chosen_labels"], (0, width - chosen_ids.shape[1]), value=IGNORE_INDEX),
                        F.pad(batch["rejected_labels"], (0, width - rejected_ids.shape[1]), value=IGNORE_INDEX)])
    logps = sequence_logprobs(model(ids).logits, labels)
    n = chosen_ids.shape[0]
    return logps[:n], logps[n:]


class DPOObjective:
    """DPO for the Trainer. The reference is a frozen copy of the starting policy (or ``reference``); its
    log-probs come from the batch (``ref_chosen_logps``/``ref_rejected_logps``, precomputed once with
    :meth:`~sparrow.post_training.preference_data.PreferenceDataset.cache_reference` or :func:`precompute_reference`)
    when present, else are computed here without gradients."""

    def __init__(self, reference: nn.Module | None = None, *, beta: float = 0.1, label_smoothing: float = 0.0,
                 loss_type: str = "sigmoid", rpo_alpha: float = 0.0):
        if rpo_alpha < 0:
            raise ValueError(f"rpo_alpha: must be >= 0, got {rpo_alpha}")
        self.reference = reference
        if reference is not None:
            reference.eval().requires_grad_(False)
        self.beta, self.label_smoothing, self.loss_type, self.rpo_alpha = beta, label_smoothing, loss_type, rpo_alpha

    @classmethod
    def from_policy(cls, policy: nn.Module, **kwargs: Any) -> "DPOObjective":
        return cls(copy.deepcopy(policy), **kwargs)

    def reference_logprobs(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        if self.reference is None:
            raise ValueError("DPO: no reference model and no precomputed ref_chosen_logps in the batch")
        with torch.no_grad():
            return pair_logprobs(self.reference, batch)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        ref_chosen, ref_rejected = self.reference_logprobs(batch)
        chosen, rejected = pair_logprobs(model, batch)
        loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta, self.label_smoothing,
                                 self.loss_type)
        if self.rpo_alpha:
            tokens = (batch["chosen_labels"][:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
            nll = -chosen.sum() / tokens
            loss = loss + self.rpo_alpha * nll
            metrics["nll/chosen"] = float(nll.detach())
        return loss, metrics

    def weight(self, batch: dict[str, Tensor]) -> float:
        return float(batch["chosen_input_ids"].shape[0])


@torch.no_grad()
def precompute_reference(reference: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    chosen, rejected = pair_logprobs(reference, batch)
    return {**batch, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor) -> tuple[Tensor, dict[str, float]]:
    """-log sigmoid(r_chosen - r_rejected), averaged, with accuracy and mean margin."""
    margin = chosen_rewards - rejected_rewards
    return -F.logsigmoid(margin).mean(), {"accuracy": float((margin > 0).float().mean()),
                                          "margin": float(margin.detach().mean())}


class RewardObjective:
    """Bradley-Terry training of a :class:`RewardModel` on ``chosen_input_ids``/``rejected_input_ids`` with
    ``chosen_lengths``/``rejected_lengths``."""

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        return bradley_terry_loss(model(batch["chosen_input_ids"], batch["chosen_lengths"]),
                                  model(batch["rejected_input_ids"], batch["rejected_lengths"]))

    def weight(self, batch: dict[str, Tensor]) -> float:
        return float(batch["chosen_input_ids"].shape[0])
