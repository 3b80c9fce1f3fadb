"""The one place where serving imports the rest of Sparrow: loading a model folder, its chat template and stop
tokens, and the per-row sampling rule. Everything in :mod:`sparrow.serving` and :mod:`sparrow.rag` goes through
these names, so a move of the library functions they wrap changes this file only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..generate import GenerationConfig, next_tokens
from ..model import KVCache, SparrowForCausalLM
from ..model_folder import load_model_and_tokenizer
from ..post_training.evaluation import exact_match
from ..tokenizer.chat import TEMPLATES, encode_messages, stop_ids, template_for

__all__ = ["GenerationConfig", "KVCache", "LoadedModel", "SparrowForCausalLM", "exact_match", "load", "next_tokens"]


@dataclass
class LoadedModel:
    """A model ready to serve: weights (eval mode), tokenizer, and how its conversations become prompt ids."""

    model: SparrowForCausalLM
    tokenizer: object
    name: str
    chat_template: str          # Jinja source, as saved in tokenizer_config.json
    stop_ids: tuple[int, ...]   # end-of-turn and end-of-text ids
    model_dir: str = ""

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def vocab_limit(self) -> int:
        return min(self.tokenizer.vocab_size, self.model.config.vocab_size)

    @property
    def template_name(self) -> str | None:
        """The name of the built-in template the model was trained with (``sparrow``, ``qa``), None if its own."""
        return next((name for name, source in TEMPLATES.items() if source == self.chat_template), None)

    def chat_ids(self, messages: Sequence[dict]) -> list[int]:
        """Prompt ids of the conversation in the model's own template (a built-in one by name, else the Jinja with
        the checkpoint's bos/eos texts), ending with the assistant header: special tokens only where the template writes them, special-token
        text in a message encoded as ordinary text (as `sparrow chat` and the SFT data do)."""
        return encode_messages(self.tokenizer, messages, self.template_name or self.chat_template,
                               add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        # A raw completion prompt is the caller's text in full (no roles to forge): special-token text in it is
        # the special token, as in `sparrow generate`.
        return self.tokenizer.encode(text, allowed_special="all")

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


def load(model_dir: str, name: str | None = None) -> LoadedModel:
    """A model folder written by a training stage (or a checkpoint's model folder inside its run)."""
    model, tokenizer = load_model_and_tokenizer(model_dir)
    path = Path(model_dir)
    template = template_for(tokenizer)  # tokenizer_config.json's chat template (load_tokenizer read it)
    template = TEMPLATES.get(template, template)
    if name is None:  # a stage writes <run>/model: the run's folder names the model better than "model"
        resolved = path.resolve()
        name = resolved.parent.name if resolved.name == "model" else resolved.name
    return LoadedModel(model, tokenizer, name, template, tuple(stop_ids(tokenizer)), str(path))
