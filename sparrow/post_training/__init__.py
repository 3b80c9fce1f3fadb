"""Post-training: everything after pretraining, on the shared :class:`sparrow.train.Trainer`.

- :mod:`.chat_data`: chat records (``messages`` or Alpaca/BELLE), assistant-only labels, SFT batches;
- :mod:`.preference_data`: prompt/chosen/rejected pairs, building them from your own checkpoints, DPO/RM batches;
- :mod:`.losses`: sequence log-probs, the DPO and Bradley-Terry losses and their Trainer objectives;
- :mod:`.reward_model`: a decoder with a scalar head;
- :mod:`.stages`: the ``sft``/``dpo``/``rm`` YAML sections and the builders of each stage's Trainer;
- :mod:`.evaluation`: exact match, perplexity and preference accuracy, through one :func:`evaluate`.

Chat templates and rendering are the tokenizer's (:mod:`sparrow.tokenizer.chat`); generation is
:mod:`sparrow.generate`.
"""

from .chat_data import SFTDataset, encode_chat, read_records, to_messages
from .evaluation import evaluate, exact_match, heldout_sample, perplexity, preference_accuracy
from .losses import DPOObjective, RewardObjective, bradley_terry_loss, dpo_loss, sequence_logprobs
from .preference_data import PreferenceDataset, build_pairs, read_pairs, write_pairs
from .reward_model import RewardModel
from .stages import StageOptions, build_dpo, build_rm, build_sft, load_stage_config

__all__ = [
    "DPOObjective", "PreferenceDataset", "RewardModel", "RewardObjective", "SFTDataset", "StageOptions",
    "bradley_terry_loss", "build_dpo", "build_pairs", "build_rm", "build_sft", "dpo_loss", "encode_chat", "evaluate",
    "exact_match", "heldout_sample", "load_stage_config", "perplexity", "preference_accuracy", "read_pairs",
    "read_records", "sequence_logprobs", "to_messages", "write_pairs",
]
