"""A Hugging Face checkpoint (a tiny random Qwen2 built by transformers) fine-tuned with ``sparrow sft`` from its
folder (``model.init_from``) and exported back: transformers loads the result as a Qwen2 with Sparrow's logits.

The folder's tokenizer here is a byte-level BPE trained by Sparrow (its special tokens and chat template); a
checkpoint's own tokenizer layout and Jinja chat template are tests/test_hf_tokenizer.py."""

from __future__ import annotations

import json

import pytest
from conftest import write_sft_config
import torch

from sparrow import SparrowForCausalLM
from sparrow.cli import main
from sparrow.tokenizer import train_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = ["Question: What is 2 plus 3?\nAnswer: 5.", "Hello world, the cat sat on the mat."]


def test_sft_from_a_transformers_checkpoint_and_export_back(tmp_path):
    folder = tmp_path / "qwen2"
    train_tokenizer(TEXTS * 20, vocab_size=300, out_dir=folder, show_progress=False)
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    start = transformers.AutoModelForCausalLM.from_config(config)
    start.save_pretrained(folder)
    chats = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": str(a + b)}]}
             for a in range(4) for b in range(4)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    write_sft_config(tmp_path, folder, max_steps=3)
    assert main(["sft", "--config", str(tmp_path / "sft.yaml")]) == 0

    tuned = SparrowForCausalLM.from_pretrained(tmp_path / "sft" / "model", backend="reference").eval()
    assert tuned.config.model_type == "qwen2" and tuned.config.qkv_bias and not tuned.config.o_bias
    assert not torch.allclose(tuned.model.layers[0].self_attn.q_proj.bias, start.model.layers[0].self_attn.q_proj.bias)
    assert main(["export", str(tmp_path / "sft" / "model"), str(tmp_path / "hf")]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(reloaded).__name__ == "Qwen2ForCausalLM"
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, tuned(ids).logits, atol=1e-4, rtol=1e-4)
