"""Training byte-level BPE tokenizers (with HF ``tokenizers``) and merging two of them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Sequence

DEFAULT_VOCAB_SIZE = 32000


def is_source(item) -> bool:
    """Whether ``item`` names a corpus source (a path, an existing glob, or "builtin") rather than being text."""
    if isinstance(item, os.PathLike):
        return True
    if not isinstance(item, str) or "\n" in item or len(item) > 1024 or not item.strip():
        return False
    import glob

    try:
        return item == "builtin" or os.path.exists(item) or bool(glob.glob(item))
    except (OSError, ValueError):
        return False


def _text_iterator(data, field: str, text_unit: str) -> Iterator[str]:
    """Files/globs/directories (text, jsonl, parquet via ``datasets``) or any iterable of strings."""
    if isinstance(data, (str, os.PathLike)):
        if not is_source(data):
            raise FileNotFoundError(f"{data}: no such file (to train on strings, pass a list or iterator of them)")
        data = [data]
    if isinstance(data, (list, tuple)) and data and all(is_source(d) for d in data):
        from sparrow.data.loading import iter_texts

        yield from iter_texts([os.fspath(d) for d in data], field=field, text_unit=text_unit)
        return
    for i, text in enumerate(data):
        if not isinstance(text, str):
            raise TypeError(f"training data item {i} is {type(text).__name__}, not str")
        yield text


def build_trainer_tokenizer(split_digits: bool = False):
    """An empty byte-level BPE tokenizer configured as Sparrow trains it. ``split_digits`` puts HF's
    ``Digits(individual_digits=True)`` in front of the split pattern (every digit its own token, for
    arithmetic); the C++ encoder loads both layouts."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors

    tok = HFTokenizer(models.BPE())
    # GPT-2 split pattern, no prefix space: what the C++ encoder's "gpt2" pattern reproduces.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_tokenizer(data, vocab_size: int = DEFAULT_VOCAB_SIZE, out_dir: str | os.PathLike | None = None, *,
                    special_tokens: Sequence[str] | None = None, min_frequency: int = 2, field: str = "text",
                    text_unit: str = "document", show_progress: bool = True, length: int | None = None,
                    chat_template: str | None = None, model_max_length: int = 2048, split_digits: bool = False):
    """Train a byte-level BPE tokenizer and (with ``out_dir``) save ``tokenizer.json`` and
    ``tokenizer_config.json`` there. Returns the HF ``tokenizers.Tokenizer``.

    ``data``: files, globs or directories (.txt/.md one document per file unless ``text_unit`` says
    "paragraph"/"line"; .jsonl/.json/.parquet read through ``datasets``, text in ``field``), or any
    iterable of strings. ``special_tokens`` default to :data:`sparrow.tokenizer.SPECIAL_TOKENS` and take
    ids 0, 1, ... in order. The 256 byte tokens come next, so any text is encodable; merges learnt on a
    multilingual corpus cover its scripts (Chinese characters become tokens, not byte triples).
    ``split_digits``: every digit its own token (see :func:`build_trainer_tokenizer`).
    """
    from tokenizers import pre_tokenizers, trainers

    from .chat import DEFAULT_CHAT_TEMPLATE, SPECIAL_TOKENS

    specials = list(SPECIAL_TOKENS if special_tokens is None else special_tokens)
    if len(set(specials)) != len(specials):
        raise ValueError(f"special tokens repeat: {specials}")
    minimum = len(specials) + 256
    if vocab_size < minimum:
        raise ValueError(f"vocab_size {vocab_size} is below {minimum} (special tokens + 256 bytes)")
    tok = build_trainer_tokenizer(split_digits)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(_text_iterator(data, field, text_unit), trainer=trainer, length=length)
    if out_dir is not None:
        save_tokenizer(tok, out_dir, specials, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE,
                       model_max_length=model_max_length)
    return tok


def save_tokenizer(tok, out_dir: str | os.PathLike, specials: Sequence[str], *, chat_template: str,
                   model_max_length: int = 2048) -> Path:
    """``tokenizer.json`` + ``tokenizer_config.json`` loadable by ``tokenizers.Tokenizer.from_file`` and
    ``transformers.PreTrainedTokenizerFast.from_pretrained`` (and by :class:`sparrow.tokenizer.Tokenizer`)."""
    from .chat import EOT

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "tokenizer.json.tmp"
    tok.save(str(tmp))
    os.replace(tmp, out / "tokenizer.json")
    eos = EOT if EOT in specials else (specials[0] if specials else None)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": eos,
        "pad_token": eos,
        "unk_token": None,
        "additional_special_tokens": [s for s in specials if s != eos],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": chat_template,
    }
    tmp = out / "tokenizer_config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / "tokenizer_config.json")
    return out / "tokenizer.json"


def _load_json(path: str | os.PathLike) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p}: not a JSON file: {exc}") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "vocab" not in model or "merges" not in model:
        raise ValueError(f"{p}: not a BPE tokenizer.json")
    return data


def _merge_pair(m) -> tuple[str, str]:
    if isinstance(m, str):
        a, b = m.split(" ")
        return a, b
    return m[0], m[1]


def merge_tokenizers(base: str | os.PathLike, extra: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write to ``out`` (a directory, or a path ending in .json) BASE extended with EXTRA's tokens and merges
    that BASE lacks, appended after BASE's ids and merge ranks.

    BASE's ids are unchanged, and text BASE encodes into whole tokens encodes exactly as before: new
    merges rank after all of BASE's, so they only fire where BASE's merges have stopped. Returns counts.
    """
    b, e = _load_json(base), _load_json(extra)
    if b.get("pre_tokenizer") != e.get("pre_tokenizer") or b.get("normalizer") != e.get("normalizer"):
        raise ValueError("BASE and EXTRA split text differently (pre_tokenizer/normalizer differ); cannot merge")
    vocab: dict[str, int] = dict(b["model"]["vocab"])
    added = list(b.get("added_tokens") or [])
    used_ids = set(vocab.values()) | {a["id"] for a in added}
    next_id = max(used_ids) + 1 if used_ids else 0
    added_contents = {a["content"] for a in added}
    extra_added = {a["content"]: a for a in e.get("added_tokens") or []}

    new_tokens = 0
    for token, _ in sorted(e["model"]["vocab"].items(), key=lambda kv: kv[1]):
        if token in vocab or token in extra_added:
            continue
        vocab[token] = next_id
        next_id += 1
        new_tokens += 1
    new_added = 0
    for content, a in sorted(extra_added.items(), key=lambda kv: kv[1]["id"]):
        if content in added_contents:
            continue
        entry = dict(a, id=next_id)
        next_id += 1
        added.append(entry)
        if content in e["model"]["vocab"] and content not in vocab:
            vocab[content] = entry["id"]
        new_added += 1

    merges = [_merge_pair(m) for m in b["model"]["merges"]]
    have = set(merges)
    new_merges = 0
    for m in e["model"]["merges"]:
        pair = _merge_pair(m)
        if pair in have:
            continue
        if pair[0] not in vocab or pair[1] not in vocab or pair[0] + pair[1] not in vocab:
            raise ValueError(f"EXTRA's merge {pair} refers to tokens missing from its vocab")
        merges.append(pair)
        have.add(pair)
        new_merges += 1

    result = dict(b)
    result["model"] = dict(b["model"], vocab=vocab, merges=[list(p) for p in merges])
    result["added_tokens"] = added
    out = Path(out)
    if out.suffix == ".json":
        out.parent.mkdir(parents=True, exist_ok=True)
        target = out
    else:
        out.mkdir(parents=True, exist_ok=True)
        target = out / "tokenizer.json"
        base_dir = Path(base) if Path(base).is_dir() else Path(base).parent
        config = base_dir / "tokenizer_config.json"
        if config.is_file():
            cfg = json.loads(config.read_text(encoding="utf-8"))
            cfg["additional_special_tokens"] = list(cfg.get("additional_special_tokens") or []) + [
                a["content"] for a in added[len(b.get("added_tokens") or []):]]
            (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                                       encoding="utf-8")
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(result, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, target)
    return {"vocab_size": next_id, "new_tokens": new_tokens, "new_added_tokens": new_added, "new_merges": new_merges}
