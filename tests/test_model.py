import json

import pytest
import torch

import sparrow
from sparrow import SparrowConfig, SparrowForCausalLM
from sparrow.model import positions_from_cu_seqlens


def tiny(**overrides) -> SparrowConfig:
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    return SparrowConfig(**{**base, **overrides})


def test_presets_build_and_count_parameters():
    for name in sparrow.PRESETS:
        config = SparrowConfig.from_preset(name)
        assert config.num_hidden_layers > 0
    config = SparrowConfig.from_preset("tiny")
    model = SparrowForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()
    assert 100e6 < SparrowConfig.from_preset("124m").num_parameters() < 130e6
    assert 0.9e9 < SparrowConfig.from_preset("1b").num_parameters() < 1.3e9


def test_config_rejects_unknown_keys_listing_valid_ones():
    with pytest.raises(ValueError, match="unknown keys \\['hiden_size'\\].*hidden_size"):
        SparrowConfig.from_dict({"hiden_size": 8})
    with pytest.raises(ValueError, match="preset"):
        SparrowConfig.from_preset("huge")
    with pytest.raises(ValueError, match="num_key_value_heads"):
        tiny(num_key_value_heads=3)


def test_forward_shapes_and_loss_ignores_minus_100():
    model = SparrowForCausalLM(tiny())
    ids = torch.randint(0, 97, (2, 10))
    out = model(ids)
    assert out.logits.shape == (2, 10, 97) and out.loss is None
    labels = ids.clone()
    labels[:, :5] = -100
    loss = model(ids, labels=labels).loss
    logits = out.logits[:, 4:-1].reshape(-1, 97)  # label at position t+1 is predicted at t
    expected = torch.nn.functional.cross_entropy(logits, ids[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_initial_loss_is_near_uniform():
    model = SparrowForCausalLM(tiny())
    ids = torch.randint(0, 97, (4, 32))
    loss = model(ids, labels=ids).loss.item()
    assert abs(loss - torch.log(torch.tensor(97.0)).item()) < 0.2


def test_trains_a_few_steps_with_loss_falling():
    torch.manual_seed(0)
    model = SparrowForCausalLM(tiny())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # A learnable pattern: each sequence counts upward modulo the vocabulary.
    starts = torch.randint(0, 97, (8, 1))
    ids = (starts + torch.arange(24)) % 97
    losses = []
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_save_load_gives_identical_logits(tmp_path):
    for tied in (False, True):
        model = SparrowForCausalLM(tiny(tie_word_embeddings=tied))
        ids = torch.randint(0, 97, (2, 12))
        model.save_pretrained(tmp_path / str(tied))
        loaded = SparrowForCausalLM.from_pretrained(tmp_path / str(tied))
        assert loaded.config == model.config
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        if tied:
            assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        saved = json.loads((tmp_path / str(tied) / "config.json").read_text())
        assert saved["model_type"] == "llama" and saved["hidden_size"] == 32
        assert not list((tmp_path / str(tied)).glob("*.tmp"))


def test_from_pretrained_missing_folder_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        SparrowForCausalLM.from_pretrained(tmp_path)


def test_positions_restart_per_document():
    cu = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    assert positions_from_cu_seqlens(cu, 8).tolist() == [0, 1, 2, 0, 0, 1, 2, 3]


def test_packed_documents_equal_separate_runs():
    model = SparrowForCausalLM(tiny()).eval()
    docs = [torch.randint(0, 97, (n,)) for n in (5, 3, 8)]
    packed = torch.cat(docs).view(2, 8)
    cu = torch.tensor([0, 5, 8, 16], dtype=torch.int32)
    logits = model(packed, cu_seqlens=cu).logits.view(16, -1)
    start = 0
    for doc in docs:
        alone = model(doc[None]).logits[0]
        torch.testing.assert_close(logits[start : start + len(doc)], alone, atol=1e-5, rtol=1e-5)
        start += len(doc)


def test_sequence_longer_than_context_is_rejected():
    model = SparrowForCausalLM(tiny(max_position_embeddings=8))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = SparrowForCausalLM(tiny())
    ids = torch.randint(0, 97, (2, 16))
    model(ids, labels=ids).loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.model.gradient_checkpointing = True
    model(ids, labels=ids).loss.backward()
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g)


def test_torch_compile_matches_eager_on_cpu():
    torch.manual_seed(0)
    model = SparrowForCausalLM(tiny(), backend="reference")
    ids = torch.randint(0, 97, (2, 16))
    eager = model(ids, labels=ids)
    compiled = torch.compile(model)
    out = compiled(ids, labels=ids)
    torch.testing.assert_close(out.logits, eager.logits, atol=1e-4, rtol=1e-4)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_trains_under_bf16_autocast():
    # Autocast keeps weights (and the embedding output) float32 while projections run in bf16: the residual
    # stream and the norms must still get a single dtype.
    model = SparrowForCausalLM(tiny())
    ids = torch.randint(0, 97, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert model.model.norm.weight.grad is not None and model.model.norm.weight.grad.dtype == torch.float32
