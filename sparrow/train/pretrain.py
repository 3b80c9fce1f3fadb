"""Pretraining: the packed token data the config names, the causal-LM objective and the shared loop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..data.packing import PackedDataset, TokenFile
from . import distributed
from .config import Config
from .trainer import Trainer, TrainResult


def _prepare_tokens(config: Config, info: distributed.DistInfo, log) -> tuple[Path, Path | None]:
    """(token file, tokenizer file or folder) for ``data.source``; the built-in corpus is prepared by rank 0 only
    and its outcome (or error) broadcast, so no rank waits on a failure it cannot see."""
    d = config.data
    if d.source != "builtin":
        tokens = TokenFile(d.source)  # missing or malformed files fail here, before the model is built
        tokenizer = tokens.meta.get("tokenizer") or None
        return Path(d.source), Path(tokenizer) if tokenizer else None
    from .builtin_data import TOKENIZER_FILE, prepare_builtin

    outcome: dict[str, Any] = {}
    if info.is_main:
        try:
            prepared = prepare_builtin(d.cache_dir, vocab_size=config.model.model_config().vocab_size,
                                       seed=d.builtin_seed, python_docs=d.builtin_python_docs,
                                       arithmetic_docs=d.builtin_arithmetic_docs, num_people=d.builtin_num_people,
                                       reading_docs=d.builtin_reading_docs, split_digits=d.builtin_split_digits,
                                       log=log)
            outcome = {"tokens": str(prepared.tokens), "tokenizer": str(prepared.tokenizer_dir / TOKENIZER_FILE)}
        except Exception as exc:
            outcome = {"error": f"{type(exc).__name__}: {exc}"}
            if not info.enabled:
                raise
    outcome = distributed.broadcast_object(outcome, info)
    if "error" in outcome:
        raise RuntimeError(f"rank 0 could not prepare the built-in corpus: {outcome['error']}")
    return Path(outcome["tokens"]), Path(outcome["tokenizer"])


def _tokenizer_files(tokenizer: Path | None) -> dict[str, Path]:
    """The tokenizer's files (tokenizer.json and, beside it, tokenizer_config.json with the chat template), to be
    copied next to the model so the run folder is self-contained."""
    if tokenizer is None or not tokenizer.exists():
        return {}
    folder = tokenizer if tokenizer.is_dir() else tokenizer.parent
    files = {tokenizer.name: tokenizer} if tokenizer.is_file() else {}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (folder / name).is_file() and (tokenizer.is_dir() or tokenizer.name == "tokenizer.json"):
            files.setdefault(name, folder / name)
    return files


def build_pretraining(config: Config, *, info: distributed.DistInfo | None = None, log=print) -> Trainer:
    """Everything a pretraining run needs, checked before any step: token file, model size against the data and
    the context, the trainer."""
    config.validate()
    info = info or distributed.init(config.train.device)
    quiet = log if info.is_main else (lambda *a, **k: None)
    token_path, tokenizer = _prepare_tokens(config, info, quiet)
    tokens = TokenFile(token_path)
    model_fields: dict[str, Any] = {"eos_token_id": tokens.eot_id}
    vocab = config.model.model_config().vocab_size
    if config.model.vocab_size is None and config.data.source != "builtin":
        vocab = tokens.vocab_size  # a token file brings its vocabulary; the preset's size would not match it
        model_fields["vocab_size"] = vocab
    if tokens.vocab_size > vocab:
        raise ValueError(f"model.vocab_size: {vocab} is smaller than the token file's vocabulary "
                         f"({tokens.vocab_size}, {tokens.json_path}); set model.vocab_size={tokens.vocab_size}")
    windows = len(tokens) // config.data.seq_len
    val = min(max(1, round(windows * config.data.val_fraction)), windows - 1) if config.data.val_fraction > 0 else 0
    data = PackedDataset(tokens, config.data.seq_len, seed=config.data.seed, val_windows=max(val, 0))
    entropy = tokens.unigram_entropy()
    header = {"data": f"{tokens.bin_path} ({len(tokens):,} tokens, {tokens.meta.get('num_documents', '?')} documents, "
                      f"{data.num_train} training windows, {data.num_val_samples} validation windows)",
              "unigram entropy": f"{entropy:.4f} nats/token (the loss of a model that ignores context)"}
    return Trainer(config, data, info=info, model_fields=model_fields, log=log, header=header,
                   extra_files=_tokenizer_files(tokenizer), unigram_entropy=entropy)


def pretrain(config: Config, *, resume: bool = False, log=print) -> TrainResult:
    trainer = build_pretraining(config, log=log)
    result = trainer.fit(resume=resume)
    if trainer.info.is_main and result.losses:
        tail = list(result.losses.values())[-10:]
        summary = {"step": result.step, "final_loss": sum(tail) / len(tail), "val_loss": result.val_loss,
                   "unigram_entropy": trainer.unigram_entropy, "tokens": result.tokens, "wall_s": result.wall_s}
        (result.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log(f"done: step {result.step}, loss {sum(tail) / len(tail):.4f} (mean of the last {len(tail)} steps) vs "
            f"unigram entropy {trainer.unigram_entropy:.4f}; {result.wall_s:.0f}s; model in {result.out_dir / 'model'}")
    return result
