"""Hugging Face checkpoints of the Llama family, built tiny and random by transformers itself (no download), load
into Sparrow with transformers' logits, and export back to their own architecture with equal logits."""

from __future__ import annotations

import json

import pytest
import torch

from sparrow import SparrowForCausalLM
from sparrow.safetensors_io import INDEX_NAME

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)

# name -> (config class, extra config kwargs, save kwargs)
CASES = {
    "llama": ("LlamaConfig", {}, {}),
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True), {}),
    "llama_bias_head_dim": ("LlamaConfig", dict(attention_bias=True, head_dim=16), {}),
    "llama3_sharded": ("LlamaConfig", dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                             high_freq_factor=4.0, original_max_position_embeddings=16),
                                           rope_theta=500000.0), dict(max_shard_size="20KB")),
    "llama_linear": ("LlamaConfig", dict(rope_scaling=dict(rope_type="linear", factor=4.0)), {}),
    "llama_dynamic": ("LlamaConfig", dict(rope_scaling=dict(rope_type="dynamic", factor=2.0)), {}),
    "llama_yarn": ("LlamaConfig", dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)), {}),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True), {}),
    "qwen3": ("Qwen3Config", dict(head_dim=16), {}),
    "mistral": ("MistralConfig", dict(sliding_window=None), {}),
    "mistral_window_covers_all": ("MistralConfig", dict(sliding_window=64), {}),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2), {}),
    # Qwen3-MoE with what Mixtral cannot hold: no top-k renormalisation and a dense layer among the MoE ones.
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, head_dim=16,
                                         norm_topk_prob=False, mlp_only_layers=[0]), {}),
}


def build_hf(name: str, tmp_path, seed: int = 0):
    cls_name, extra, save_kwargs = CASES[name]
    config = getattr(transformers, cls_name)(**SMALL, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random, non-trivial norms and biases (init sets them to 1 and 0)
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight") or pname.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path / name
    model.save_pretrained(folder, **save_kwargs)
    return model, folder


def tokens(n: int = 2, t: int = 40, vocab: int = 96, seed: int = 1):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(CASES))
def test_hf_checkpoint_loads_with_transformers_logits(name, tmp_path):
    hf_model, folder = build_hf(name, tmp_path)
    if name == "llama3_sharded":
        assert (folder / INDEX_NAME).is_file() and not (folder / "model.safetensors").exists()
    model = SparrowForCausalLM.from_pretrained(folder, backend="reference").eval()
    assert model.config.model_type == hf_model.config.model_type
    ids = tokens()
    with torch.no_grad():
        expected = hf_model(ids).logits
        actual = model(ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama3_sharded", "qwen2", "qwen3", "mistral", "llama_yarn", "llama_bias_head_dim",
                                  "mixtral", "qwen3_moe"])
def test_export_round_trips_through_transformers_in_the_same_architecture(name, tmp_path):
    hf_model, folder = build_hf(name, tmp_path)
    model = SparrowForCausalLM.from_pretrained(folder, backend="reference").eval()
    out = tmp_path / "exported"
    model.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["model_type"] == hf_model.config.model_type
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(hf_model)
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, hf_model(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("field, value, config_cls", [
    ("sliding_window", 16, "MistralConfig"),
    ("partial_rotary_factor", 0.5, "LlamaConfig"),
    ("mlp_bias", True, "LlamaConfig"),
    ("hidden_act", "gelu", "LlamaConfig"),
])
def test_math_changing_field_is_refused_by_name(field, value, config_cls, tmp_path):
    config = getattr(transformers, config_cls)(**SMALL, **{field: value})
    folder = tmp_path / "m"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    with pytest.raises(ValueError, match=field):
        SparrowForCausalLM.from_pretrained(folder)


def test_unsupported_rope_kind_and_architecture_are_refused_by_name(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    base = dict(SMALL, model_type="llama")
    (folder / "config.json").write_text(json.dumps(dict(base, rope_scaling={"rope_type": "longrope", "short_factor": [1.0]})))
    with pytest.raises(ValueError, match="rope_type.*longrope"):
        SparrowForCausalLM.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(dict(base, model_type="qwen2_moe")))
    with pytest.raises(ValueError, match="model_type.*qwen2_moe"):
        SparrowForCausalLM.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(dict(base, some_new_knob=3)))
    with pytest.raises(ValueError, match="some_new_knob"):
        SparrowForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("rope", [
    dict(rope_type="linear", factor=4.0),
    dict(rope_type="dynamic", factor=2.0),
    dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16),
    dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=16, mscale=1.0, mscale_all_dim=0.5),
    dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=32, truncate=False, attention_factor=1.3),
])
def test_rope_frequencies_match_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from sparrow.model import SparrowConfig, rope_frequencies

    hf_config = transformers.LlamaConfig(**dict(SMALL, head_dim=16), rope_scaling=dict(rope))
    expected, expected_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_config)
    config = SparrowConfig.from_hf_dict(hf_config.to_dict())
    inv_freq, factor = rope_frequencies(config)
    torch.testing.assert_close(inv_freq.float(), expected, atol=0, rtol=1e-6)
    assert factor == pytest.approx(expected_factor, rel=1e-12)
    default, _ = rope_frequencies(SparrowConfig.from_hf_dict(transformers.LlamaConfig(**dict(SMALL, head_dim=16)).to_dict()))
    if rope["rope_type"] != "dynamic":  # dynamic changes nothing within max_position_embeddings
        assert not torch.allclose(inv_freq, default)


@pytest.mark.parametrize("name", ["qwen3", "llama3_sharded"])
def test_greedy_generation_matches_transformers(name, tmp_path):
    from sparrow.generate import GenerationConfig, generate

    hf_model, folder = build_hf(name, tmp_path)
    model = SparrowForCausalLM.from_pretrained(folder, backend="reference").eval()
    prompt = tokens(1, 8)[0].tolist()
    new = 12
    expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(model, [prompt], GenerationConfig(max_new_tokens=new))[0] == expected


def test_sparrow_config_refuses_unknown_rope_scaling_by_name():
    from sparrow import SparrowConfig

    with pytest.raises(ValueError, match="rope_scaling.rope_type"):
        SparrowConfig.from_preset("tiny", rope_scaling={"rope_type": "longrope"})
    with pytest.raises(ValueError, match="rope_scaling.low_freq_factor"):
        SparrowConfig.from_preset("tiny", rope_scaling={"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1.0})
    with pytest.raises(ValueError, match="rope_scaling.factor"):
        SparrowConfig.from_preset("tiny", rope_scaling={"rope_type": "linear"})
