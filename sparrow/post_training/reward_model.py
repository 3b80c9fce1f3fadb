"""The reward model: the decoder of a causal LM with a scalar head, trained by ``sparrow rm`` with the
Bradley-Terry loss (:class:`sparrow.post_training.losses.RewardObjective`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..model import SparrowConfig, SparrowForCausalLM
from ..safetensors_io import load_weights


class RewardModel(nn.Module):
    """The decoder of a causal LM with a scalar head read at each row's last real token."""

    def __init__(self, config: SparrowConfig, backend: str | None = None):
        super().__init__()
        self.config = config
        self.model = SparrowForCausalLM(config, backend=backend).model
        self.score = nn.Linear(config.hidden_size, 1, bias=False)
        nn.init.normal_(self.score.weight, std=1 / (config.hidden_size + 1))

    @classmethod
    def from_causal_lm(cls, lm: SparrowForCausalLM) -> "RewardModel":
        rm = cls(lm.config, backend=lm.backend)
        rm.model.load_state_dict(lm.model.state_dict())
        return rm

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, backend: str | None = None) -> "RewardModel":
        """A folder the Trainer wrote for a reward model (config.json, model.safetensors with ``score.weight``)."""
        directory = Path(directory)
        values, state = load_weights(directory, made_by="`sparrow rm`")
        config = SparrowConfig.from_hf_dict(values)
        rm = cls(config, backend=backend)
        if "score.weight" not in state:
            raise ValueError(f"{directory}: not a reward model (no score.weight); train one with `sparrow rm`")
        rm.load_state_dict(state)
        return rm

    def forward(self, input_ids: Tensor, lengths: Tensor) -> Tensor:
        """Rewards (batch,) for right-padded ``input_ids`` whose real lengths are ``lengths``."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.model(input_ids, positions, None, None)
        last = hidden[torch.arange(input_ids.shape[0], device=input_ids.device), lengths.long() - 1]
        return self.score(last).squeeze(-1).float()
