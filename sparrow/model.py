"""A Llama-style decoder: token embeddings, pre-norm blocks of GQA attention with RoPE and a SwiGLU MLP,
final RMSNorm and an LM head (optionally tied to the embeddings).

With ``num_local_experts > 0`` the MLP of every ``decoder_sparse_step``-th block (less ``mlp_only_layers``) is a
mixture of experts, as Mixtral and Qwen3-MoE: a softmax top-k router (renormalised over the chosen k when
``norm_topk_prob``) sends each token to k SwiGLU experts (:func:`sparrow.ops.moe_experts`), and training adds the
Switch load-balancing loss (per layer) and the ST-MoE router z-loss, weighted by their coefficients.

Every norm, rotary and attention call goes through :mod:`sparrow.ops`, so the kernels are swapped with one
argument (``SparrowForCausalLM(config, backend="triton")`` or :func:`sparrow.patch`). Module and parameter
names follow Hugging Face's ``LlamaForCausalLM``, and so do the config fields, which makes export a copy.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import ops
from .hf.experts import experts_from_hf, experts_to_hf
from .hf.config import ROPE_KEYS, hf_config_from_sparrow, sparrow_fields_from_hf
from .hf.patching import is_transformers_model, patch_transformers
from .safetensors_io import CONFIG_NAME, WEIGHTS_NAME, load_config, load_state, save_weights  # noqa: F401

# The label of positions that carry no loss (prompts, padding, a packed document's first token).
IGNORE_INDEX = -100


@dataclass
class SparrowConfig:
    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # Llama-family variants (Hugging Face checkpoints; see sparrow.hf.config). head_dim None means
    # hidden_size // num_attention_heads.
    head_dim: int | None = None
    qkv_bias: bool = False                  # bias on q/k/v projections (Qwen2; Llama/Qwen3 attention_bias)
    o_bias: bool = False                    # bias on the output projection (Llama/Qwen3 attention_bias)
    qk_norm: bool = False                   # per-head RMSNorm of q and k before RoPE (Qwen3)
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": linear|dynamic|llama3|yarn, ...} as transformers
    model_type: str = "llama"               # the architecture export writes back (llama, mistral, qwen2, qwen3,
                                            # mixtral, qwen3_moe)
    # Mixture of experts (Hugging Face's Mixtral / Qwen3-MoE names). 0 experts: every MLP is dense.
    num_local_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None  # each expert's inner size; None means intermediate_size
    norm_topk_prob: bool = True             # renormalise the k chosen probabilities to sum to 1 (Mixtral: always)
    decoder_sparse_step: int = 1            # layer i is MoE when (i + 1) % step == 0 ...
    mlp_only_layers: list[int] = field(default_factory=list)  # ... and i is not listed here
    router_aux_loss_coef: float = 0.001     # weight of the load-balancing loss in the training loss
    router_z_loss_coef: float = 0.0         # weight of the router z-loss (mean squared logsumexp of router logits)

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive int, got {value!r}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size: {self.hidden_size} is not divisible by num_attention_heads ({self.num_attention_heads})")
        elif not isinstance(self.head_dim, int) or self.head_dim < 1:
            raise ValueError(f"head_dim: must be a positive int or None, got {self.head_dim!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads: {self.num_key_value_heads} must divide num_attention_heads ({self.num_attention_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim: {self.head_dim} must be even for rotary embeddings")
        rope_frequencies(self)  # refuses a rope_scaling it does not implement, by name
        if not isinstance(self.num_local_experts, int) or self.num_local_experts < 0:
            raise ValueError(f"num_local_experts: must be an int >= 0, got {self.num_local_experts!r}")
        if self.num_local_experts:
            if self.moe_intermediate_size is None:
                self.moe_intermediate_size = self.intermediate_size
            for name in ("num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step"):
                value = getattr(self, name)
                if not isinstance(value, int) or value < 1:
                    raise ValueError(f"{name}: must be a positive int, got {value!r}")
            if self.num_experts_per_tok > self.num_local_experts:
                raise ValueError(f"num_experts_per_tok: {self.num_experts_per_tok} exceeds num_local_experts ({self.num_local_experts})")
            bad = [i for i in self.mlp_only_layers if not isinstance(i, int) or not 0 <= i < self.num_hidden_layers]
            if bad:
                raise ValueError(f"mlp_only_layers: {bad} are not layer indices in [0, {self.num_hidden_layers})")
            for name in ("router_aux_loss_coef", "router_z_loss_coef"):
                if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                    raise ValueError(f"{name}: must be a number >= 0, got {getattr(self, name)!r}")

    def is_moe_layer(self, index: int) -> bool:
        """Whether block ``index`` has a mixture-of-experts MLP (Qwen3-MoE's rule; Mixtral: every block)."""
        return (self.num_local_experts > 0 and index not in self.mlp_only_layers
                and (index + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SparrowConfig":
        known = set(cls.field_names())
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; valid keys are {sorted(known)}")
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "SparrowConfig":
        if name not in PRESETS:
            raise ValueError(f"preset: unknown {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config as transformers reads it, in this model's own architecture (``model_type``)."""
        return hf_config_from_sparrow(self.to_dict())

    @classmethod
    def from_hf_dict(cls, values: dict[str, Any]) -> "SparrowConfig":
        """From a Hugging Face config.json (llama, mistral, qwen2, qwen3); refuses math-changing fields it lacks."""
        return cls(**sparrow_fields_from_hf(values))

    def num_parameters(self, *, active: bool = False) -> int:
        """Parameter count; ``active=True`` counts only the k experts a token runs through (the per-token compute)."""
        h, i, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        per_layer = 2 * h * q + 2 * h * kv + 2 * h
        per_layer += (q + 2 * kv) * self.qkv_bias + h * self.o_bias + 2 * self.head_dim * self.qk_norm
        mlps = 0
        for index in range(L):
            if self.is_moe_layer(index):
                experts = self.num_experts_per_tok if active else self.num_local_experts
                mlps += experts * 3 * h * self.moe_intermediate_size + self.num_local_experts * h
            else:
                mlps += 3 * h * i
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return L * per_layer + mlps + embeddings + h


# Presets by name. `tiny` trains in minutes on 2 CPU cores; `26m` is the size the Chinese tiny-LLM projects
# start with; `124m` is GPT-2-small class; `1b` is TinyLlama's shape.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
    "26m": dict(vocab_size=6400, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True),
    "124m": dict(vocab_size=50304, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, max_position_embeddings=2048, tie_word_embeddings=True),
    # `moe-tiny`: tiny's attention with 8 experts of 192, 2 per token: 1.32M parameters active per token of 3.09M.
    "moe-tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, model_type="mixtral",
                     num_local_experts=8, num_experts_per_tok=2, moe_intermediate_size=192, router_aux_loss_coef=0.3,
                     router_z_loss_coef=0.001),
    # A GPU-sized Mixtral shape: 124m's width and depth, 8 experts of 2048, 2 per token: 157M active of 497M.
    "moe-500m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                     tie_word_embeddings=True, model_type="mixtral", num_local_experts=8, num_experts_per_tok=2,
                     moe_intermediate_size=2048, router_aux_loss_coef=0.01, router_z_loss_coef=0.001),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False),
}


@dataclass
class CausalLMOutput:
    logits: Tensor
    loss: Tensor | None = None  # with labels: cross-entropy, plus the weighted router losses of an MoE model in training mode
    # MoE models, with labels: the load-balancing loss, the router z-loss, and the tokens each expert received
    # (MoE layers, experts) int64, top-k assignments counted.
    aux_loss: Tensor | None = None
    z_loss: Tensor | None = None
    expert_counts: Tensor | None = None


class KVCache:
    """Per-layer key/value buffers of shape (batch, max_len, kv_heads, head_dim) and ``lengths`` (int32, per
    row): how many positions of each row hold real tokens.

    A forward with ``kv_cache=cache`` writes the new keys/values of row ``b`` at ``lengths[b]:lengths[b] + T``,
    places its tokens at those positions (RoPE) and advances every row by ``T``. Prompts of different lengths
    are right-padded and prefilled together; afterwards set ``lengths`` to the true prompt lengths, so the
    padding is overwritten by the next tokens and never attended (it sits past each row's length, and the
    causal mask keeps the real prompt tokens from seeing it during the prefill).
    """

    def __init__(self, config: SparrowConfig, batch_size: int, max_len: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        if max_len > config.max_position_embeddings:
            raise ValueError(f"max_len: {max_len} exceeds max_position_embeddings ({config.max_position_embeddings})")
        shape = (batch_size, max_len, config.num_key_value_heads, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]


def positions_from_cu_seqlens(cu_seqlens: Tensor, num_tokens: int) -> Tensor:
    """Position of each packed token within its own document (restarting at 0 for each)."""
    tokens = torch.arange(num_tokens, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens[1:].long(), tokens, right=True).clamp_max(cu_seqlens.numel() - 2)
    return tokens - cu_seqlens.long()[doc]


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.backend: str | None = None

    def forward(self, x: Tensor) -> Tensor:
        return ops.rms_norm(x, self.weight.to(x.dtype), self.eps, backend=self.backend)

    def add_and_norm(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """(norm(x + residual), x + residual)."""
        # Under autocast the weight stays float32 while activations are bf16; the kernels take one dtype, and
        # the cast is differentiable, so the float32 master weight still gets its gradient.
        return ops.fused_add_rms_norm(x, residual, self.weight.to(x.dtype), self.eps, backend=self.backend)


def rope_frequencies(config: SparrowConfig) -> tuple[Tensor, float]:
    """(inverse frequencies (head_dim // 2,) float64, attention factor scaling cos and sin), computed as
    transformers' ``modeling_rope_utils`` does for each ``rope_scaling`` kind.

    ``dynamic`` (NTK) rescales the base only for sequences longer than ``max_position_embeddings``, which Sparrow
    refuses, so within Sparrow's range its frequencies are the default ones exactly.
    """
    dim, base = config.head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = dict(config.rope_scaling or {})
    kind = scaling.pop("rope_type", "default")
    if kind not in ROPE_KEYS:
        raise ValueError(f"rope_scaling.rope_type: {kind!r} is not implemented; use one of {sorted(ROPE_KEYS)}")
    unknown = sorted(set(scaling) - ROPE_KEYS[kind])
    if unknown:
        raise ValueError(f"rope_scaling.{unknown[0]}: not a parameter of rope_type {kind!r} (those are {sorted(ROPE_KEYS[kind])})")

    def number(name: str, default: float | None = None, *, minimum: float | None = None) -> float:
        value = scaling.get(name, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or (minimum is not None and value < minimum):
            raise ValueError(f"rope_scaling.{name}: expected a number{'' if minimum is None else f' >= {minimum}'} for rope_type {kind!r}, got {value!r}")
        return float(value)

    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / number("factor", minimum=1.0), 1.0
    if kind == "dynamic":
        number("factor", minimum=1.0)
        return inv_freq, 1.0
    if kind == "llama3":
        factor, low, high = number("factor", minimum=1.0), number("low_freq_factor"), number("high_freq_factor")
        old_len = number("original_max_position_embeddings", minimum=1)
        if high <= low:
            raise ValueError(f"rope_scaling.high_freq_factor: must exceed low_freq_factor ({low}), got {high}")
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        old_len = number("original_max_position_embeddings", minimum=1)
        factor = scaling.get("factor")
        factor = config.max_position_embeddings / old_len if factor is None else number("factor", minimum=1.0)

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # as transformers: avoid a zero-width ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        return inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation, float(attention_factor)
    raise AssertionError(kind)  # ROPE_KEYS lists exactly the kinds handled above


class RotaryEmbedding(nn.Module):
    """cos/sin tables of shape (rotary_dim // 2,) per position, built once up to max_position_embeddings
    (scaled by the rope_scaling's attention factor, as transformers scales its cos and sin)."""

    def __init__(self, config: SparrowConfig):
        super().__init__()
        inv_freq, attention_factor = rope_frequencies(config)
        angles = torch.outer(torch.arange(config.max_position_embeddings, dtype=torch.float64), inv_freq)
        self.register_buffer("cos_cached", (angles.cos() * attention_factor).float(), persistent=False)
        self.register_buffer("sin_cached", (angles.sin() * attention_factor).float(), persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return self.cos_cached[positions].to(dtype), self.sin_cached[positions].to(dtype)


class Attention(nn.Module):
    def __init__(self, config: SparrowConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.backend: str | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor | None, max_seqlen: int | None,
                cache: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = ops.apply_rope(q, k, cos, sin, backend=self.backend)
        if cache is not None:
            k_cache, v_cache, slots, new_lengths = cache
            rows = torch.arange(b, device=x.device).unsqueeze(1)
            k_cache[rows, slots] = k.to(k_cache.dtype)
            v_cache[rows, slots] = v.to(v_cache.dtype)
            # SparrowForCausalLM.forward has bounded the lengths (one sync per forward, not one per layer).
            out = ops.attention_with_kv_cache(q, k_cache.to(q.dtype), v_cache.to(q.dtype), new_lengths,
                                              backend=self.backend, check_lengths=False)
        elif cu_seqlens is None:
            out = ops.attention(q, k, v, causal=True, backend=self.backend)
        else:
            out = ops.attention_varlen(
                q.reshape(b * t, self.num_heads, self.head_dim),
                k.reshape(b * t, self.num_kv_heads, self.head_dim),
                v.reshape(b * t, self.num_kv_heads, self.head_dim),
                # SparrowModel.forward has checked cu_seqlens once for all layers (a host sync each).
                cu_seqlens, max_seqlen, causal=True, backend=self.backend, check_seqlens=False,
            )
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: SparrowConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoeExperts(nn.Module):
    """The experts' weights as 3-D tensors (transformers 5's layout): ``gate_up_proj`` (E, 2I, H), the gate
    projection stacked over the up projection, and ``down_proj`` (E, H, I)."""

    def __init__(self, config: SparrowConfig):
        super().__init__()
        e, h, i = config.num_local_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))


class MoeMLP(nn.Module):
    """Softmax top-k router + routed SwiGLU experts. ``forward`` returns the output and the router logits
    (tokens, experts), from which the model derives the auxiliary losses and the per-expert counts."""

    def __init__(self, config: SparrowConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = MoeExperts(config)
        self.backend: str | None = None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        tokens = x.reshape(-1, x.shape[-1])
        router_logits = self.gate(tokens)
        # As transformers: softmax in float32 over all experts, then the top k (renormalised if asked).
        probs = torch.softmax(router_logits.float(), dim=-1)
        topk_weights, topk_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        # The ids come from topk over this router's experts: in range, so no host sync to check them.
        out = ops.moe_experts(tokens, topk_ids, topk_weights.to(x.dtype), self.experts.gate_up_proj.to(x.dtype),
                              self.experts.down_proj.to(x.dtype), backend=self.backend, check_ids=False)
        return out.view(x.shape), router_logits


def router_losses(router_logits: list[Tensor], top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(load-balancing loss, z-loss, expert counts (layers, experts)) over every MoE layer's router logits.

    The balancing loss is Switch Transformer's (eq. 4-6) per layer, averaged over the MoE layers:
    ``E * sum_e f_e * P_e``, f_e the fraction of the layer's top-k assignments that went to expert e and P_e its
    mean router probability; k when routing is uniform. Per layer, because transformers' Mixtral form (one sum
    over the concatenated layers, which this equals for a single MoE layer) lets one layer starve an expert
    while another overfeeds it: moe-tiny trained with it left a layer's expert with 0 of 4096 assignments. The
    z-loss (ST-MoE) is the mean squared logsumexp of the logits, which keeps them small.
    """
    logits = torch.stack([r.float() for r in router_logits])  # (layers, tokens, experts)
    experts, tokens = logits.shape[-1], logits.shape[1]
    probs = torch.softmax(logits, dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices
    counts = F.one_hot(chosen, experts).sum(dim=(1, 2))  # (layers, experts)
    tokens_per_expert = counts.float() / tokens
    prob_per_expert = probs.mean(dim=1)
    aux = experts * (tokens_per_expert * prob_per_expert).sum(-1).mean()
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    return aux, z, counts


class DecoderLayer(nn.Module):
    def __init__(self, config: SparrowConfig, index: int = 0):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MoeMLP(config) if config.is_moe_layer(index) else MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden: Tensor, residual: Tensor | None, cos: Tensor, sin: Tensor,
                cu_seqlens: Tensor | None, max_seqlen: int | None, cache=None) -> tuple[Tensor, Tensor, Tensor | None]:
        """(output, residual, router logits of an MoE MLP or None)."""
        # The residual stream is carried separately so each add fuses with the norm that follows it.
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.self_attn(hidden, cos, sin, cu_seqlens, max_seqlen, cache)
        hidden, residual = self.post_attention_layernorm.add_and_norm(hidden, residual)
        if isinstance(self.mlp, MoeMLP):
            hidden, router_logits = self.mlp(hidden)
            return hidden, residual, router_logits
        return self.mlp(hidden), residual, None


class SparrowModel(nn.Module):
    def __init__(self, config: SparrowConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.gradient_checkpointing = False

    def forward(self, input_ids: Tensor, position_ids: Tensor, cu_seqlens: Tensor | None, max_seqlen: int | None,
                kv_cache: KVCache | None = None, router_logits: list[Tensor] | None = None) -> Tensor:
        """The final hidden states; MoE layers append their router logits to ``router_logits`` when given."""
        if cu_seqlens is not None and isinstance(max_seqlen, int):
            ops.check_cu_seqlens(cu_seqlens, input_ids.numel(), max_seqlen)  # once here, not in every layer
        hidden = self.embed_tokens(input_ids)
        if torch.is_autocast_enabled(hidden.device.type):
            # Autocast leaves the embedding in float32 but makes every projection bf16; a single dtype for the
            # residual stream is what the fused add+norm kernels take.
            hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
        cos, sin = self.rotary(position_ids, hidden.dtype)
        residual = None
        if kv_cache is not None:
            new_lengths = (kv_cache.lengths + input_ids.shape[1]).to(torch.int32)
        for i, layer in enumerate(self.layers):
            if kv_cache is not None:
                cache = (kv_cache.keys[i], kv_cache.values[i], position_ids, new_lengths)
                hidden, residual, logits = layer(hidden, residual, cos, sin, None, None, cache)
            elif self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden, residual, logits = checkpoint(layer, hidden, residual, cos, sin, cu_seqlens, max_seqlen,
                                                      use_reentrant=False)
            else:
                hidden, residual, logits = layer(hidden, residual, cos, sin, cu_seqlens, max_seqlen)
            if logits is not None and router_logits is not None:
                router_logits.append(logits)
        if kv_cache is not None:
            kv_cache.lengths = new_lengths
        if residual is None:  # no layers
            return self.norm(hidden)
        hidden, _ = self.norm.add_and_norm(hidden, residual)
        return hidden


class SparrowForCausalLM(nn.Module):
    def __init__(self, config: SparrowConfig, backend: str | None = None):
        super().__init__()
        self.config = config
        self.model = SparrowModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)
        # Scaled init (GPT-2): each residual branch's output projection shrinks with depth so the residual
        # stream's variance stays put as layers are added.
        residual_std = config.initializer_range / math.sqrt(2 * config.num_hidden_layers)
        for layer in self.model.layers:
            nn.init.normal_(layer.self_attn.o_proj.weight, std=residual_std)
            if isinstance(layer.mlp, MoeMLP):
                nn.init.normal_(layer.mlp.experts.gate_up_proj, std=config.initializer_range)
                nn.init.normal_(layer.mlp.experts.down_proj, std=residual_std)
            else:
                nn.init.normal_(layer.mlp.down_proj.weight, std=residual_std)
        patch(self, backend)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def backend(self) -> str | None:
        return self.model.norm.backend

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        *,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
        position_ids: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> CausalLMOutput:
        """Logits for ``input_ids`` (batch, seq), and the next-token loss when ``labels`` is given.

        ``labels`` are aligned with ``input_ids`` (as in Hugging Face: the shift happens here) and -100 marks
        positions without a loss. ``cu_seqlens`` (int32, over the batch * seq flattened tokens) marks packed
        document boundaries: attention stays inside each document and positions restart at each; pass
        ``max_seqlen`` (the longest document) to avoid a host sync. With ``kv_cache`` (:class:`KVCache`) the
        tokens continue each row's cached sequence (see there); ``cu_seqlens`` and ``position_ids`` do not apply.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected (batch, seq), got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if kv_cache is not None:
            if cu_seqlens is not None or position_ids is not None:
                raise ValueError("kv_cache: cannot be combined with cu_seqlens or position_ids")
            if kv_cache.batch_size != b:
                raise ValueError(f"kv_cache: holds {kv_cache.batch_size} rows but input_ids has {b}")
            position_ids = kv_cache.lengths.long().unsqueeze(1) + torch.arange(t, device=input_ids.device)
            # The layers' attention takes these lengths unchecked: this is the one host sync of a cached forward.
            lengths_ok = (kv_cache.lengths >= 0) & (position_ids[:, -1] < kv_cache.max_len)
            if not bool(lengths_ok.all()):
                raise ValueError(f"kv_cache: {t} new tokens overflow the cache of {kv_cache.max_len} positions, or a "
                                 f"length is negative (each must lie in [0, {kv_cache.max_len - t}])")
        elif position_ids is None:
            if cu_seqlens is None:
                position_ids = torch.arange(t, device=input_ids.device)
            else:
                position_ids = positions_from_cu_seqlens(cu_seqlens, b * t).view(b, t)
        if cu_seqlens is not None and max_seqlen is None:
            max_seqlen = int(cu_seqlens.diff().max())
        if t > self.config.max_position_embeddings or (max_seqlen is not None and max_seqlen > self.config.max_position_embeddings):
            raise ValueError(f"input_ids: sequence length {max(t, max_seqlen or 0)} exceeds max_position_embeddings ({self.config.max_position_embeddings})")
        router_logits: list[Tensor] = []
        hidden = self.model(input_ids, position_ids, cu_seqlens, max_seqlen, kv_cache, router_logits)
        logits = self.lm_head(hidden)
        if labels is None:
            return CausalLMOutput(logits=logits)
        loss = causal_lm_loss(logits, labels)
        if not router_logits:
            return CausalLMOutput(logits=logits, loss=loss)
        # As transformers, over every token of the batch (padding included: packed batches have none).
        aux, z, counts = router_losses(router_logits, self.config.num_experts_per_tok)
        if self.training:  # regularisers of training: validation losses and perplexities stay the cross-entropy
            loss = loss + self.config.router_aux_loss_coef * aux + self.config.router_z_loss_coef * z
        return CausalLMOutput(logits=logits, loss=loss, aux_loss=aux, z_loss=z, expert_counts=counts)

    # ------------------------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors``; each file lands atomically (temp + rename)."""
        save_weights(directory, experts_to_hf(self.state_dict(), self.config.model_type), self.config.to_hf_dict(),
                     tied_embeddings=self.config.tie_word_embeddings)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, backend: str | None = None,
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "SparrowForCausalLM":
        """Load a folder written by :meth:`save_pretrained` or a Hugging Face checkpoint of the Llama family
        (llama, mistral, qwen2, qwen3, mixtral, qwen3_moe; single or sharded safetensors; see :mod:`sparrow.hf`)."""
        config = SparrowConfig.from_hf_dict(load_config(directory))  # refuses what it cannot compute before any I/O
        state = experts_from_hf(load_state(directory), config.model_type)
        model = cls(config, backend=backend)
        # Older transformers versions saved the rotary inverse frequencies; Sparrow rebuilds them from the config.
        state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # tied: the embedding is the head
        missing, unexpected = model.load_state_dict(state, strict=False)
        allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
        if set(missing) - allowed_missing or unexpected:
            raise ValueError(f"{directory}: weights missing {sorted(set(missing) - allowed_missing)}, unexpected {sorted(unexpected)}")
        return model.to(device=device, dtype=dtype)


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100 (computed in float32)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


def patch(model: nn.Module, backend: str | None):
    """Swap the ops backend of every Sparrow module in ``model``, in place; ``None`` follows
    :func:`sparrow.ops.use_backend` / ``$SPARROW_BACKEND``. Returns the model.

    A transformers model of the Llama family (llama, mistral, qwen2, qwen3) gets Sparrow's norms, rotary and
    attention swapped in instead (:func:`sparrow.hf.patching.patch_transformers`), and the return value is the
    record of what was swapped, whose ``undo()`` restores the model."""
    if backend is not None and backend not in (*ops.BACKENDS, "auto"):
        raise ValueError(f"backend: must be one of {(*ops.BACKENDS, 'auto')} or None, got {backend!r}")
    if is_transformers_model(model):
        return patch_transformers(model, backend)
    found = False
    for module in model.modules():
        if isinstance(module, (RMSNorm, Attention, MoeMLP)):
            module.backend = backend
            found = True
    if not found:
        raise ValueError(f"model: {type(model).__name__} holds no Sparrow modules and is not a transformers model "
                         "of a supported architecture (llama, mistral, qwen2, qwen3)")
    return model
