"""Training: one loop (:mod:`.trainer`) with pluggable objectives, shared by pretraining, SFT and DPO; YAML configs
with command-line overrides (:mod:`.config`); exact-resume checkpoints (:mod:`.checkpoint`); DDP/FSDP2 under
torchrun (:mod:`.distributed`); metrics and the loss curve (:mod:`.metrics`); the built-in corpus cleaned, tokenized
and cached for pretraining (:mod:`.builtin_data`). The fine-tuning stages are :mod:`sparrow.post_training`."""

from .config import Config, load_config
from .pretrain import build_pretraining, pretrain
from .trainer import BatchSource, CausalLMObjective, NonFiniteLossError, Objective, Trainer, TrainResult

__all__ = [
    "BatchSource",
    "CausalLMObjective",
    "Config",
    "NonFiniteLossError",
    "Objective",
    "TrainResult",
    "Trainer",
    "build_pretraining",
    "load_config",
    "pretrain",
]
