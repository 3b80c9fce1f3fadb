"""A tiny chat model trained in the test session (tokenizer + a few dozen optimiser steps on chat-formatted
questions), shared by the serving, retrieval and browser tests."""

from __future__ import annotations

from pathlib import Path

import torch

_CACHE: dict[str, Path] = {}

QUESTIONS = [(f"What is {a} plus {b}?", str(a + b)) for a in range(6) for b in range(6)]
QUESTIONS += [(f"{a} 加 {b} 等于多少？", f"{a + b}") for a in range(4) for b in range(4)]
QUESTIONS += [("Where does Bala Kou live?", "Dunmore"), ("王明住在哪里？", "青川城"), ("Say hello", "Hello world")]


def trained_model(tmp_path_factory, context: int = 512) -> Path:
    """Folder of a 2-layer model (context ``context``) trained for 30 steps; trained once per session."""
    key = f"ctx{context}"
    if key in _CACHE:
        return _CACHE[key]
    from sparrow import SparrowConfig, SparrowForCausalLM
    from sparrow.model import IGNORE_INDEX
    from sparrow.post_training.chat_data import encode_chat
    from sparrow.tokenizer.chat import render
    from sparrow.tokenizer import Tokenizer, train_tokenizer

    folder = tmp_path_factory.mktemp("serve_model") / "chat" / "model"
    texts = [render([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in QUESTIONS]
    train_tokenizer(texts * 10, vocab_size=400, out_dir=folder, show_progress=False)
    tok = Tokenizer.from_file(folder / "tokenizer.json")
    torch.manual_seed(0)
    config = SparrowConfig.from_preset("tiny", vocab_size=400, num_hidden_layers=2, max_position_embeddings=context)
    model = SparrowForCausalLM(config, backend="reference")
    rows = [encode_chat(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
            for q, a in QUESTIONS]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in rows])
    labels = torch.tensor([l + [IGNORE_INDEX] * (width - len(l)) for _, l in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared CPU: one thread is several times faster than all
    try:
        for _ in range(30):
            loss = model(ids, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval().save_pretrained(folder)
    _CACHE[key] = folder
    return folder
