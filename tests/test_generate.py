import math
import warnings

import pytest
import torch

from sparrow import SparrowConfig, SparrowForCausalLM
from sparrow.generate import (
    GenerationConfig,
    apply_repetition_penalty,
    banned_ngram_tokens,
    filter_top_k_top_p,
    generate,
    stream,
    stream_text,
)
from sparrow.model import KVCache


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = SparrowConfig.from_preset("tiny", vocab_size=300, max_position_embeddings=96)
    # A larger init spreads the logits so greedy choices are not near-ties decided by rounding.
    config.initializer_range = 0.2
    return SparrowForCausalLM(config, backend="reference").eval()


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (n,), generator=g).tolist() for n in lengths]


def test_cached_decoding_logits_equal_a_full_forward_per_row(model):
    rows = prompts([9, 4, 6])
    continuation = prompts([5, 5, 5], seed=2)
    cache = KVCache(model.config, 3, 20)
    batch = torch.zeros(3, 9, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, :len(r)] = torch.tensor(r)
    with torch.no_grad():
        prefill = model(batch, kv_cache=cache).logits
        cache.lengths = torch.tensor([len(r) for r in rows], dtype=torch.int32)
        steps = [model(torch.tensor([[c[j]] for c in continuation]), kv_cache=cache).logits[:, 0] for j in range(5)]
        for i, r in enumerate(rows):
            full = model(torch.tensor([r + continuation[i]])).logits[0]
            n = len(r)
            torch.testing.assert_close(prefill[i, :n], full[:n], atol=2e-4, rtol=1e-4)
            torch.testing.assert_close(torch.stack([s[i] for s in steps]), full[n:], atol=2e-4, rtol=1e-4)
    assert cache.lengths.tolist() == [14, 9, 11]


def test_cache_overflow_and_mixing_with_packing_are_rejected(model):
    cache = KVCache(model.config, 1, 4)
    with pytest.raises(ValueError, match="overflow"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(torch.zeros(1, 2, dtype=torch.long), kv_cache=cache, cu_seqlens=torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        KVCache(model.config, 1, 97)
    # The layers take the lengths unchecked (no host sync per layer), so the model refuses bad ones up front.
    cache.lengths = torch.tensor([-1], dtype=torch.int32)
    with pytest.raises(ValueError, match="negative"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)


def host_syncs(fn) -> int:
    """How many times ``fn`` makes the host wait for the GPU (torch's sync debug mode warns at each)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.cuda
def test_host_syncs_of_cached_and_packed_forwards_do_not_grow_with_layers():
    # Each sync drains the GPU queue: a check per layer made decoding launch-bound (82 tokens/s for a 124M model
    # on an H200) and packed training paid 4 per layer. The model now checks once per forward.
    counts = {}
    for layers in (1, 4):
        torch.manual_seed(0)
        config = SparrowConfig.from_preset("tiny", vocab_size=300, max_position_embeddings=96,
                                           num_hidden_layers=layers)
        model = SparrowForCausalLM(config).cuda().eval()
        cache = KVCache(config, 2, 32, device="cuda")
        ids = torch.zeros(2, 8, dtype=torch.long, device="cuda")
        cu = torch.tensor([0, 3, 8, 16], dtype=torch.int32, device="cuda")
        with torch.no_grad():
            model(ids[:, :5], kv_cache=cache)
            decode = host_syncs(lambda: model(ids[:, :1], kv_cache=cache))
            packed = host_syncs(lambda: model(ids.reshape(1, 16), cu_seqlens=cu, max_seqlen=8))
        counts[layers] = (decode, packed)
    assert counts[4] == counts[1], counts
    assert counts[1][0] <= 1 and counts[1][1] <= 1, counts


def test_batched_greedy_equals_one_prompt_at_a_time(model):
    batch = prompts([3, 11, 7, 1])
    config = GenerationConfig(max_new_tokens=12)
    together = generate(model, batch, config)
    alone = [generate(model, [p], config)[0] for p in batch]
    assert together == alone
    assert all(len(out) == 12 for out in together)


def test_greedy_matches_argmax_of_full_forwards(model):
    prompt = prompts([5])[0]
    out = generate(model, [prompt], GenerationConfig(max_new_tokens=6))[0]
    ids = list(prompt)
    for _ in range(6):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert out == ids[len(prompt):]


def test_stop_token_ends_its_row_only(model):
    batch = prompts([4, 6])
    free = generate(model, batch, GenerationConfig(max_new_tokens=10))
    stop = free[0][3]
    first = free[0].index(stop)
    out = generate(model, batch, GenerationConfig(max_new_tokens=10, stop_ids=[stop]))
    assert out[0] == free[0][:first + 1]
    expected_second = free[1][:free[1].index(stop) + 1] if stop in free[1] else free[1]
    assert out[1] == expected_second


def test_streaming_yields_the_generated_tokens(model):
    prompt = prompts([5])[0]
    config = GenerationConfig(max_new_tokens=8)
    assert list(stream(model, prompt, config)) == generate(model, [prompt], config)[0]


class ByteTokenizer:
    def decode(self, ids):
        return bytes(i % 256 for i in ids).decode("utf-8", errors="replace")


def test_stream_text_holds_back_split_characters_and_concatenates_to_the_text():
    torch.manual_seed(0)
    config = SparrowConfig.from_preset("tiny", vocab_size=256, max_position_embeddings=64)
    model = SparrowForCausalLM(config, backend="reference").eval()
    # Force the output "é" (two bytes, 0xC3 0xA9) then "a": a bias on the LM head picks each next byte.
    targets = [0xC3, 0xA9, ord("a")]
    calls = {"n": 0}

    def hook(module, inputs, output):
        output = output.clone()
        output[:, -1, targets[min(calls["n"], 2)]] += 1e4
        calls["n"] += 1
        return output

    handle = model.lm_head.register_forward_hook(hook)
    try:
        pieces = list(stream_text(model, ByteTokenizer(), [1, 2], GenerationConfig(max_new_tokens=3)))
    finally:
        handle.remove()
    assert pieces == ["é", "a"]


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy(model):
    prompt = prompts([6])[0]
    sampled = GenerationConfig(max_new_tokens=10, temperature=1.0, seed=3)
    assert generate(model, [prompt], sampled) == generate(model, [prompt], sampled)
    greedy = generate(model, [prompt], GenerationConfig(max_new_tokens=10))
    assert generate(model, [prompt], GenerationConfig(max_new_tokens=10, temperature=0.7, top_k=1, seed=5)) == greedy


def test_vocab_limit_keeps_ids_the_tokenizer_can_decode(model):
    prompt = prompts([5])[0]
    free = generate(model, [prompt] * 8, GenerationConfig(max_new_tokens=12, temperature=1.5, seed=2))
    assert max(max(row) for row in free) >= 150  # unrestricted sampling reaches the upper half of the table
    for config in (GenerationConfig(max_new_tokens=12, temperature=1.5, seed=2, vocab_limit=150),
                   GenerationConfig(max_new_tokens=12, vocab_limit=150)):
        assert max(max(row) for row in generate(model, [prompt] * 8, config)) < 150
    with pytest.raises(ValueError, match="vocab_limit"):
        GenerationConfig(vocab_limit=0)


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = torch.isfinite(filter_top_k_top_p(logits, 0, 0.8))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.8, 0.5 + 0.3 reaches it
    kept = torch.isfinite(filter_top_k_top_p(logits, 0, 0.81))
    assert kept.tolist() == [[True, True, True, False]]
    kept = torch.isfinite(filter_top_k_top_p(logits, 2, 1.0))
    assert kept.tolist() == [[True, True, False, False]]
    # The top token survives even when it alone exceeds top_p.
    assert torch.isfinite(filter_top_k_top_p(logits, 0, 0.1)).tolist() == [[True, False, False, False]]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 3.0]])
    out = apply_repetition_penalty(logits, [[0, 1, 1]], 2.0)
    assert out.tolist() == [[1.0, -2.0, 3.0]]


def test_no_repeat_ngram_bans_completions_of_seen_ngrams(model):
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == {3}
    assert banned_ngram_tokens([5, 6, 5, 7, 5], 2) == {6, 7}
    assert banned_ngram_tokens([1, 2], 3) == set()
    prompt = [7, 7, 7]
    out = generate(model, [prompt], GenerationConfig(max_new_tokens=30, no_repeat_ngram_size=2))[0]
    seq = prompt + out
    bigrams = list(zip(seq, seq[1:]))
    # The prompt's own (7, 7) repeats are given; no generated token may repeat a bigram.
    generated = bigrams[len(prompt) - 1:]
    assert len(set(generated)) == len(generated) and (7, 7) not in generated


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=-1)
    assert math.isclose(GenerationConfig().top_p, 1.0)
