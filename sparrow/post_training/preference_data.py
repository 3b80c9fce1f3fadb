"""Preference data: jsonl records ``{"prompt", "chosen", "rejected"}``, encoded as chat pairs, and built from
your own checkpoints (a weaker model's sampled answer is ``rejected``, the reference answer ``chosen``)."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..generate import GenerationConfig, generate
from ..tokenizer.chat import IGNORE_INDEX, decode_answer, prompt_ids
from .chat_data import encode_chat, read_records, to_messages
from .losses import pad_right, pair_logprobs


def similarity(a: str, b: str) -> float:
    """Character-level similarity in [0, 1] (difflib's ratio): 1 for equal strings."""
    return difflib.SequenceMatcher(None, a.strip(), b.strip(), autojunk=False).ratio()


def build_pairs(model, tokenizer, examples: Sequence[tuple[str, str]], *, template: str | None = None,
                max_new_tokens: int = 16, temperature: float = 1.0, top_k: int = 0, seed: int = 0,
                max_similarity: float = 0.8, batch_size: int = 32) -> list[dict[str, str]]:
    """For each (prompt, reference answer): sample the model's answer to the prompt as a chat turn; keep
    ``{"prompt", "chosen": reference, "rejected": sample}`` unless the two are more similar than
    ``max_similarity`` (a sample that is right, or nearly, teaches nothing as a rejection)."""
    prompts = [prompt_ids(tokenizer, p, template) for p, _ in examples]
    pairs = []
    for start in range(0, len(prompts), batch_size):
        config = GenerationConfig.for_tokenizer(tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                                                top_k=top_k, seed=seed + start)
        outputs = generate(model, prompts[start:start + batch_size], config)
        for (prompt, answer), out in zip(examples[start:start + batch_size], outputs):
            sample = decode_answer(tokenizer, out).strip()
            if sample and similarity(sample, answer) <= max_similarity:
                pairs.append({"prompt": prompt, "chosen": answer, "rejected": sample})
    return pairs


def last_turn_examples(path: str | Path, *, limit: int | None = None, seed: int = 0) -> list[tuple[str, str]]:
    """(question, reference answer) of each conversation's last user turn and its assistant answer, from a chat
    jsonl as for SFT; with ``limit``, a sample of that many drawn with ``seed``."""
    import random

    examples = []
    for i, record in enumerate(read_records(path), 1):
        messages = to_messages(record)
        if messages[-1]["role"] != "assistant" or len(messages) < 2 or messages[-2]["role"] != "user":
            raise ValueError(f"{path}:{i}: the conversation must end with a user turn and its assistant answer")
        examples.append((messages[-2]["content"], messages[-1]["content"]))
    if limit is not None and limit < len(examples):
        examples = random.Random(seed).sample(examples, limit)
    return examples


def write_pairs(pairs: Iterable[dict[str, str]], path: str | Path) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.dumps(p, ensure_ascii=False) for p in pairs]
    path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    return len(rows)


def read_pairs(path: str | Path) -> list[dict[str, str]]:
    records = read_records(path)
    for i, r in enumerate(records):
        missing = {"prompt", "chosen", "rejected"} - {k for k, v in r.items() if v is not None}
        if missing:
            raise ValueError(f"{path}: record {i} lacks {sorted(missing)}")
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in records]


def _messages(prompt: Any, answer: str) -> list[dict[str, str]]:
    history = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return [*history, {"role": "assistant", "content": answer}]


class PreferenceDataset:
    """Encoded pairs served as right-padded batches for DPO and the reward model (a Trainer BatchSource)."""

    def __init__(self, pairs: Sequence[dict], tokenizer, *, template: str | None = None, max_length: int = 256,
                 val_pairs: Sequence[dict] = ()):
        def encode(items):
            out = []
            for p in items:
                chosen = encode_chat(tokenizer, _messages(p["prompt"], p["chosen"]), template, max_length)
                rejected = encode_chat(tokenizer, _messages(p["prompt"], p["rejected"]), template, max_length)
                out.append({"chosen": chosen, "rejected": rejected})
            return out

        self.train, self.val = encode(pairs), encode(val_pairs)
        if not self.train:
            raise ValueError("preference data: no pairs")
        self.ref: dict[str, list[tuple[float, float]]] | None = None

    def __len__(self) -> int:
        return len(self.train)

    @property
    def num_val_samples(self) -> int:
        return len(self.val)

    @torch.no_grad()
    def cache_reference(self, reference, batch_size: int = 16) -> None:
        """Compute the reference model's log-probs of every pair once; batches then carry them, so DPO
        needs no reference forward (and no reference model) during training."""
        self.ref = {}
        was_training = reference.training
        reference.eval()
        device = next(reference.parameters()).device
        for name, items in (("train", self.train), ("val", self.val)):
            values = []
            for start in range(0, len(items), batch_size):
                batch = {k: v.to(device) for k, v in self._collate(items[start:start + batch_size], None).items()}
                chosen, rejected = pair_logprobs(reference, batch)
                values += list(zip(chosen.tolist(), rejected.tolist()))
            self.ref[name] = values
        reference.train(was_training)

    def _collate(self, items: list[dict], ref: list[tuple[float, float]] | None) -> dict[str, torch.Tensor]:
        batch = {}
        for side in ("chosen", "rejected"):
            batch[f"{side}_input_ids"] = pad_right([it[side][0] for it in items], 0)
            batch[f"{side}_labels"] = pad_right([it[side][1] for it in items], IGNORE_INDEX)
            batch[f"{side}_lengths"] = torch.tensor([len(it[side][0]) for it in items])
        if ref is not None:
            batch["ref_chosen_logps"] = torch.tensor([r[0] for r in ref])
            batch["ref_rejected_logps"] = torch.tensor([r[1] for r in ref])
        return batch

    def _slice(self, name: str, indices: list[int]) -> dict[str, torch.Tensor]:
        items = self.train if name == "train" else self.val
        ref = [self.ref[name][i] for i in indices] if self.ref is not None else None
        return self._collate([items[i] for i in indices], ref)

    def train_batch(self, first_sample: int, count: int) -> dict[str, torch.Tensor]:
        return self._slice("train", [(first_sample + i) % len(self.train) for i in range(count)])

    def val_batch(self, first_sample: int, count: int) -> dict[str, torch.Tensor]:
        return self._slice("val", list(range(first_sample, min(first_sample + count, len(self.val)))))

    def all_pairs(self, name: str = "val") -> dict[str, torch.Tensor]:
        items = self.train if name == "train" else self.val
        return self._slice(name, list(range(len(items))))
