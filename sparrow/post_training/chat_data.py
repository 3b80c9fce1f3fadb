"""Chat data for supervised fine-tuning: Alpaca/BELLE/``messages`` records, assistant-only labels, batches.

The chat templates and their rendering live in :mod:`sparrow.tokenizer.chat`. Labels are
:data:`~sparrow.tokenizer.chat.IGNORE_INDEX` everywhere except the assistant's answers and their end-of-turn token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..tokenizer.chat import IGNORE_INDEX, encode_messages, encode_text, render_for


def to_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """A chat from a ``messages`` record, or from Alpaca/BELLE ``instruction``/``input``/``output`` (optional
    ``system`` and ``history`` as [[question, answer], ...])."""
    # datasets fills keys that only other records have with None: treat those as absent.
    record = {k: v for k, v in record.items() if v is not None}
    if "messages" in record:
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    elif "instruction" in record and "output" in record:
        messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        for question, answer in record.get("history") or []:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        question = record["instruction"]
        if record.get("input"):
            question = f"{question}\n{record['input']}"
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": record["output"]}]
    else:
        raise ValueError(f"SFT record: expected 'messages' or 'instruction'/'output', got keys {sorted(record)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("SFT record: no assistant turn to learn from")
    return messages


def encode_chat(tokenizer, messages: Sequence[dict], template: str | None = None,
                max_length: int | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a whole conversation; labels keep only each assistant answer and its end token.
    ``template`` defaults to the model's (:func:`~sparrow.tokenizer.chat.template_for`), a checkpoint's Jinja
    included.

    The conversation is encoded once; an answer's token span is found by rendering and encoding the
    conversation before it (with the generation prompt) and through it, which is exact whenever BPE does not
    merge across the boundary (role headers end in a newline or a special token, so it does not) and otherwise
    starts at the first differing token. A template whose rendering of earlier turns changes with later ones
    (e.g. one that drops past reasoning) is outside this rule.
    """
    encode = lambda msgs, gen=False: encode_messages(tokenizer, list(msgs), template, add_generation_prompt=gen)
    ids = encode(messages)
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = encode(messages[:i], True)
        through_text = render_for(tokenizer, messages[:i + 1], template)
        through = encode(messages[:i + 1])
        # "through" ends with the end-of-turn token, then maybe "\n": the newline belongs to the template.
        end = len(through) - len(encode_text(tokenizer, "\n")) if through_text.endswith("\n") else len(through)
        start = 0
        while start < min(len(before), len(ids)) and before[start] == ids[start]:
            start += 1
        for j in range(start, min(end, len(ids))):
            labels[j] = ids[j]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a .jsonl/.json file, through ``datasets`` when it is installed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        from datasets import load_dataset
    except ImportError:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return list(load_dataset("json", data_files=str(path), split="train"))


class SFTDataset:
    """Encoded conversations served as right-padded batches (``input_ids``, ``labels``) or, with ``pack``,
    as one row of concatenated conversations with ``cu_seqlens`` so none attends to another. Implements the
    Trainer's BatchSource."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], *, pad_id: int = 0, pack: bool = False,
                 val_examples: list[tuple[list[int], list[int]]] | None = None):
        examples = [e for e in examples if any(l != IGNORE_INDEX for l in e[1][1:])]
        if not examples:
            raise ValueError("SFT data: no example has an assistant token to learn from (too short max_length?)")
        self.examples, self.pad_id, self.pack = examples, pad_id, pack
        self.val_examples = val_examples or []

    @classmethod
    def from_records(cls, records: Iterable[dict], tokenizer, *, template: str | None = None, max_length: int = 512,
                     **kwargs: Any) -> "SFTDataset":
        return cls([encode_chat(tokenizer, to_messages(r), template, max_length) for r in records], **kwargs)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_val_samples(self) -> int:
        return len(self.val_examples)

    def _collate(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
        if self.pack:
            ids = [t for r in rows for t in r[0]]
            # Each conversation's first label would be predicted from the previous one; it is -100 anyway
            # (a template header), but mask it so packing can never leak a target across documents.
            labels = [l for r in rows for l in [IGNORE_INDEX] + r[1][1:]]
            lengths = [len(r[0]) for r in rows]
            cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
            return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "cu_seqlens": cu,
                    "max_seqlen": max(lengths)}
        longest = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        for i, (x, y) in enumerate(rows):
            ids[i, :len(x)] = torch.tensor(x)
            labels[i, :len(y)] = torch.tensor(y)
        return {"input_ids": ids, "labels": labels}

    def train_batch(self, first_sample: int, count: int) -> dict[str, Any]:
        n = len(self.examples)
        return self._collate([self.examples[(first_sample + i) % n] for i in range(count)])

    def val_batch(self, first_sample: int, count: int) -> dict[str, Any]:
        return self._collate(self.val_examples[first_sample:first_sample + count])
