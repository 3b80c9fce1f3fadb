"""sparrow.patch on transformers models: what it swaps, undo, logits and every gradient equal to the unpatched
model (reference backend), packed documents without cross-document attention, torch.compile, and a 20-step
convergence run patched vs unpatched (as Liger-Kernel's convergence tests)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import sparrow
from sparrow.testing import assert_close

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                                         high_freq_factor=4.0, original_max_position_embeddings=16)),
    "mistral": lambda: transformers.MistralConfig(**SMALL, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=16),
}


def make(name: str, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="sdpa").to(dtype)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight") or pname.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch(b: int = 2, t: int = 24, seed: int = 1):
    ids = torch.randint(0, SMALL["vocab_size"], (b, t), generator=torch.Generator().manual_seed(seed))
    return ids, ids.clone()


def forward_backward(model, ids, labels, params_of=None, **kwargs):
    params_of = params_of or model  # a compiled wrapper prefixes the parameter names
    params_of.zero_grad(set_to_none=True)
    out = model(ids, labels=labels, use_cache=False, **kwargs)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in params_of.named_parameters() if p.grad is not None}


def assert_same(patched, unpatched):
    logits, grads = patched
    ref_logits, ref_grads = unpatched
    assert_close(logits, ref_logits, name="logits")
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], grad=True, name=name)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_patch_swaps_and_keeps_logits_and_gradients(name):
    model = make(name)
    ids, labels = batch()
    expected = forward_backward(model, ids, labels)
    record = sparrow.patch(model, "reference")
    layers = SMALL["num_hidden_layers"]
    assert record.swapped == {"rms_norm": (2 * layers + 1) + (2 * layers if name == "qwen3" else 0),
                              "fused_add_rms_norm": layers, "rotary": record.rotary, "attention": layers}
    assert record.rotary.endswith(f"modeling_{name}.apply_rotary_pos_emb")
    assert model.config._attn_implementation == "sparrow"
    assert_same(forward_backward(model, ids, labels), expected)
    record.undo()
    assert model.config._attn_implementation == "sdpa"
    assert not any(type(m).__name__.startswith("Sparrow") for m in model.modules())
    assert_same(forward_backward(model, ids, labels), expected)


def test_packed_documents_do_not_attend_across_and_match_unpatched():
    model = make("llama")
    ids, labels = batch(b=2, t=24)
    # two rows, each packing documents of 10 + 14 and 5 + 19 tokens: positions restart per document
    position_ids = torch.cat([torch.cat([torch.arange(10), torch.arange(14)]),
                              torch.cat([torch.arange(5), torch.arange(19)])]).view(2, 24)
    expected = forward_backward(model, ids, labels, position_ids=position_ids)
    record = sparrow.patch(model, "reference")
    calls = []
    original = sparrow.ops.attention_varlen
    sparrow.hf.patching.ops.attention_varlen = lambda *a, **k: calls.append(a[3]) or original(*a, **k)
    try:
        got = forward_backward(model, ids, labels, position_ids=position_ids)
    finally:
        sparrow.hf.patching.ops.attention_varlen = original
    assert calls and calls[0].tolist() == [0, 10, 24, 29, 48]
    # Found once per forward (a host sync: nonzero), not once per layer: every layer got the same tensor.
    assert len(calls) == model.config.num_hidden_layers > 1 and all(c is calls[0] for c in calls)
    assert_same(got, expected)
    # the second document of row 0 alone gives the same logits as inside the pack: nothing crossed over
    alone = model(ids[:1, 10:], use_cache=False).logits.detach()
    assert_close(got[0][0, 10:], alone[0], name="second document alone")
    record.undo()


def test_padding_mask_and_generation_stay_exact():
    model = make("qwen2")
    ids, _ = batch(b=2, t=12)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        expected_gen = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    record = sparrow.patch(model, "reference")
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        got_gen = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    assert_close(got[0], expected[0], name="row 0")
    assert_close(got[1, 4:], expected[1, 4:], name="row 1 real tokens")
    assert torch.equal(got_gen, expected_gen)
    record.undo()


def test_unsupported_architecture_and_config_are_refused_by_name():
    config = transformers.MixtralConfig(**SMALL, num_local_experts=2, num_experts_per_tok=1)
    with pytest.raises(ValueError, match="mixtral"):
        sparrow.patch(transformers.AutoModelForCausalLM.from_config(config), "reference")
    windowed = transformers.AutoModelForCausalLM.from_config(transformers.MistralConfig(**SMALL, sliding_window=8))
    with pytest.raises(ValueError, match="sliding_window"):
        sparrow.patch(windowed, "reference")


def test_two_patched_models_share_the_rotary_swap_until_the_last_undo():
    from transformers.models.llama import modeling_llama

    original = modeling_llama.apply_rotary_pos_emb
    first, second = sparrow.patch(make("llama"), "reference"), sparrow.patch(make("llama", seed=1), "reference")
    first.undo()
    assert modeling_llama.apply_rotary_pos_emb is not original
    second.undo()
    assert modeling_llama.apply_rotary_pos_emb is original
    with pytest.raises(ValueError, match="no Sparrow modules"):
        sparrow.patch(torch.nn.Linear(2, 2), "reference")


@pytest.mark.parametrize("packed", [False, True])
def test_patched_model_compiles(packed):
    model = make("llama")
    ids, labels = batch()
    kwargs = {"position_ids": torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24)} if packed else {}
    expected = forward_backward(model, ids, labels, **kwargs)
    record = sparrow.patch(model, "reference")
    compiled = torch.compile(model, backend="aot_eager")
    assert_same(forward_backward(compiled, ids, labels, params_of=model, **kwargs), expected)
    record.undo()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="the triton backend needs a GPU or TRITON_INTERPRET=1")
def test_triton_backend_within_tolerances():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = make("qwen3", dtype=torch.bfloat16).to(device)  # the triton attention takes bf16 / fp16
    ids, labels = (t.to(device) for t in batch(b=1, t=16))
    expected = forward_backward(model, ids, labels)
    record = sparrow.patch(model, "triton")
    assert_same(forward_backward(model, ids, labels), expected)
    record.undo()


def test_twenty_steps_patched_vs_unpatched_converge_alike():
    """As Liger-Kernel's convergence tests: same init, same data, 20 AdamW steps; the loss curves agree."""
    ids = torch.randint(0, SMALL["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(3))

    def train(model):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for step in range(20):
            rows = ids[(step % 2) * 2:(step % 2) * 2 + 2]
            loss = model(rows, labels=rows, use_cache=False).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, model

    unpatched_losses, unpatched = train(make("llama"))
    patched_model = make("llama")
    sparrow.patch(patched_model, "reference")
    patched_losses, patched = train(patched_model)
    assert patched_losses[-1] < patched_losses[0] - 0.5  # it learns
    torch.testing.assert_close(torch.tensor(patched_losses), torch.tensor(unpatched_losses), atol=1e-4, rtol=1e-4)
    for (name, p), q in zip(patched.named_parameters(), unpatched.parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
