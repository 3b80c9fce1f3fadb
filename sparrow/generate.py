"""Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p), repetition penalty,
no-repeat-n-gram, stop tokens, batched prompts of different lengths, and streaming.

    from sparrow.generate import GenerationConfig, generate, stream_text
    out = generate(model, [ids_a, ids_b], GenerationConfig(max_new_tokens=64, stop_ids=[end_id]))
    for piece in stream_text(model, tokenizer, prompt_ids, GenerationConfig(temperature=0.8, top_p=0.9)):
        print(piece, end="", flush=True)

Prompts of a batch are right-padded and prefilled in one forward; every row then continues from its own
length (:class:`sparrow.model.KVCache`), so a batch gives the same tokens as each prompt alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor

from .model import KVCache, SparrowForCausalLM
from .tokenizer.chat import stop_ids


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0          # 0: greedy
    top_k: int = 0                    # 0: off
    top_p: float = 1.0                # 1: off
    repetition_penalty: float = 1.0   # 1: off; > 1 discourages tokens already in prompt or output (CTRL / HF rule)
    no_repeat_ngram_size: int = 0     # 0: off
    stop_ids: Sequence[int] = field(default_factory=tuple)
    seed: int | None = None
    # Ids >= this are never emitted: a model's embedding table padded past its tokenizer's vocabulary (50304 rows
    # for GPT-2's 50257 tokens) has ids the tokenizer cannot decode. None: the whole table.
    vocab_limit: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.no_repeat_ngram_size < 0:
            raise ValueError("top_k, no_repeat_ngram_size: must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty: must be > 0, got {self.repetition_penalty}")
        if self.vocab_limit is not None and self.vocab_limit < 1:
            raise ValueError(f"vocab_limit: must be >= 1, got {self.vocab_limit}")

    @classmethod
    def for_tokenizer(cls, tokenizer, **settings) -> "GenerationConfig":
        """Settings for generating with ``tokenizer``: stop at the end of a turn or of the text, and never emit
        an id the tokenizer cannot decode (``vocab_limit``); ``settings`` are the other fields."""
        return cls(stop_ids=stop_ids(tokenizer), vocab_limit=getattr(tokenizer, "vocab_size", None), **settings)


def apply_repetition_penalty(logits: Tensor, seen: list[list[int]], penalty: float) -> Tensor:
    if penalty == 1.0:
        return logits
    logits = logits.clone()
    for row, tokens in enumerate(seen):
        if not tokens:
            continue
        idx = torch.tensor(sorted(set(tokens)), device=logits.device)
        values = logits[row, idx]
        # Dividing a negative logit would raise it; multiplying lowers it, so both directions penalise.
        logits[row, idx] = torch.where(values > 0, values / penalty, values * penalty)
    return logits


def banned_ngram_tokens(tokens: list[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already present in ``tokens``."""
    if n <= 0 or len(tokens) < n:
        return set()
    prefix = tuple(tokens[len(tokens) - n + 1:]) if n > 1 else ()
    return {tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n - 1]) == prefix}


def filter_top_k_top_p(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Logits with everything outside the top-k and outside the smallest set of mass >= top_p set to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p; the most likely token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: Tensor, seen: list[list[int]], config: GenerationConfig, generator: torch.Generator | None) -> Tensor:
    """One token per row from last-position logits (batch, vocab)."""
    logits = apply_repetition_penalty(logits.float(), seen, config.repetition_penalty)
    if config.no_repeat_ngram_size:
        for row, tokens in enumerate(seen):
            banned = banned_ngram_tokens(tokens, config.no_repeat_ngram_size)
            if banned:
                logits[row, list(banned)] = float("-inf")
    if config.temperature == 0:
        return logits.argmax(-1)
    logits = filter_top_k_top_p(logits / config.temperature, config.top_k, config.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def stream_batch(model: SparrowForCausalLM, prompts: Sequence[Sequence[int]], config: GenerationConfig,
                 pad_id: int = 0) -> Iterator[list[int | None]]:
    """Yields, per decoding step, one new token per row (``None`` for rows already stopped). A row stops
    after emitting a stop token (which is yielded) or after ``max_new_tokens``."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: need at least one prompt, each with at least one token")
    if config.max_new_tokens == 0:
        return
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    max_len = longest + config.max_new_tokens
    if max_len > model.config.max_position_embeddings:
        raise ValueError(f"max_new_tokens: prompt ({longest}) + {config.max_new_tokens} new tokens exceed "
                         f"max_position_embeddings ({model.config.max_position_embeddings})")
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    batch = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        batch[row, :len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
    cache = KVCache(model.config, len(prompts), max_len, device=device, dtype=dtype)
    logits = model(batch, kv_cache=cache).logits
    true_lengths = torch.tensor(lengths, device=device)
    cache.lengths = true_lengths.to(torch.int32)
    last = logits[torch.arange(len(prompts), device=device), true_lengths - 1]
    seen = [list(p) for p in prompts]
    stops = set(int(s) for s in config.stop_ids)
    done = [False] * len(prompts)
    for step in range(config.max_new_tokens):
        if config.vocab_limit is not None and config.vocab_limit < last.shape[-1]:
            last = last.clone()
            last[:, config.vocab_limit:] = float("-inf")
        chosen = next_tokens(last, seen, config, generator).tolist()
        emitted: list[int | None] = []
        for row, token in enumerate(chosen):
            if done[row]:
                emitted.append(None)
                continue
            seen[row].append(token)
            emitted.append(token)
            if token in stops:
                done[row] = True
        yield emitted
        if all(done) or step == config.max_new_tokens - 1:
            return
        # Stopped rows keep decoding a pad token: cheaper than reshaping the cache, and their output is dropped.
        feed = torch.tensor([pad_id if t is None else t for t in emitted], device=device).unsqueeze(1)
        last = model(feed, kv_cache=cache).logits[:, -1]


def generate(model: SparrowForCausalLM, prompts: Sequence[Sequence[int]], config: GenerationConfig | None = None,
             pad_id: int = 0) -> list[list[int]]:
    """New tokens per prompt (the stop token, when reached, is included)."""
    config = config or GenerationConfig()
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in stream_batch(model, prompts, config, pad_id):
        for row, token in enumerate(step):
            if token is not None:
                outputs[row].append(token)
    return outputs


def stream(model: SparrowForCausalLM, prompt: Sequence[int], config: GenerationConfig | None = None) -> Iterator[int]:
    """Token ids of one prompt's continuation, one at a time."""
    for step in stream_batch(model, [prompt], config or GenerationConfig()):
        yield step[0]


def stream_text(model: SparrowForCausalLM, tokenizer, prompt: Sequence[int], config: GenerationConfig | None = None,
                *, skip_stop: bool = True) -> Iterator[str]:
    """Decoded text as it grows. A character split across byte-level tokens is held back until complete,
    so the pieces concatenate to the final text."""
    config = config or GenerationConfig()
    stops = set(config.stop_ids)
    ids: list[int] = []
    emitted = ""
    for token in stream(model, prompt, config):
        if skip_stop and token in stops:
            break
        ids.append(token)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(emitted):
            yield text[len(emitted):]
            emitted = text
    text = tokenizer.decode(ids)
    if len(text) > len(emitted):
        yield text[len(emitted):]
