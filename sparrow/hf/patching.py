"""Swap Sparrow's kernels into transformers models of the Llama family, in place and undoably.

``sparrow.patch(model, backend)`` lands here for a transformers model. One table (:data:`ARCHITECTURES`) says,
per ``model_type``, which modeling module and RMSNorm class to swap; one function (:func:`patch_transformers`)
does it for all of them:

- every RMSNorm module (Qwen3's per-head q/k norms included) gets a subclass whose forward is
  :func:`sparrow.ops.rms_norm`;
- every decoder layer gets a subclass whose forward fuses the attention block's residual add with the
  post-attention norm (:func:`sparrow.ops.fused_add_rms_norm`); the MLP's residual add stays as it is, since
  the next norm belongs to the next layer (or the model's final norm);
- the modeling module's ``apply_rotary_pos_emb`` becomes :func:`sparrow.ops.apply_rope` (process-wide, as the
  attention layers look it up by name at call time);
- attention runs through transformers' own registry: ``AttentionInterface.register("sparrow", ...)`` and
  ``model.set_attn_implementation("sparrow")``, with a mask function of our own that tells plain causal
  attention (:func:`sparrow.ops.attention`) and packed documents (position ids restarting per document: varlen
  :func:`sparrow.ops.attention_varlen` over cu_seqlens derived from the position ids, no cross-document
  attention) from anything else. Anything else (a padding mask, decoding against a cache) is handed to
  transformers' own sdpa attention with its mask, so the result never changes.

The config must be one Sparrow loads (:func:`sparrow.hf.config.sparrow_fields_from_hf`), so a sliding window or
another math-changing field is refused by name rather than silently computed differently.
"""

from __future__ import annotations

import importlib
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .. import ops
from .config import sparrow_fields_from_hf

# model_type -> (modeling module, RMSNorm class, decoder layer class): the four share one decoder-layer structure
# (pre-norm attention and MLP blocks, each followed by its residual add).
ARCHITECTURES: dict[str, tuple[str, str, str]] = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaRMSNorm", "LlamaDecoderLayer"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm", "MistralDecoderLayer"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm", "Qwen2DecoderLayer"),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", "Qwen3RMSNorm", "Qwen3DecoderLayer"),
}

ATTENTION_NAME = "sparrow"

# modeling module -> number of patched models using its swapped apply_rotary_pos_emb; the original comes back
# when the last one is undone. (The function is module-global, so the backend of the latest patch serves all.)
_ROPE_USERS: dict[str, int] = {}


def is_transformers_model(model: nn.Module) -> bool:
    # Only a model built by an already imported transformers can be one: no import here.
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


# ------------------------------------------------------------------------------------------------ norms
_SUBCLASSES: dict[type, type] = {}


def _sparrow_rms_norm_forward(self, hidden_states: Tensor) -> Tensor:
    out = ops.rms_norm(hidden_states, self.weight.to(hidden_states.dtype), self.variance_epsilon,
                       backend=self.sparrow_backend)
    # transformers multiplies a float32 weight with the input-dtype normed values: keep its result dtype
    return out.to(torch.promote_types(self.weight.dtype, hidden_states.dtype))


def _fused_decoder_layer_forward(self, hidden_states: Tensor, attention_mask: Any = None, position_ids: Tensor | None = None,
                                 cache: Any = None, use_cache: bool | None = False,
                                 position_embeddings: tuple[Tensor, Tensor] | None = None, **kwargs: Any) -> Tensor:
    """transformers' decoder layer, with ``residual + attention`` and the post-attention norm in one op."""
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                      cache=cache, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
    norm = self.post_attention_layernorm
    if hidden_states.dtype == residual.dtype:
        hidden_states, residual = ops.fused_add_rms_norm(hidden_states, residual, norm.weight.to(hidden_states.dtype),
                                                         norm.variance_epsilon, backend=self.sparrow_backend)
        hidden_states = hidden_states.to(torch.promote_types(norm.weight.dtype, residual.dtype))
    else:  # mixed dtypes (autocast over float32 embeddings): transformers' own promotion, unfused
        residual = residual + hidden_states
        hidden_states = norm(residual)
    return residual + self.mlp(hidden_states)


def _subclass(cls: type, forward: Callable) -> type:
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"Sparrow{cls.__name__}", (cls,), {"forward": forward})
    return _SUBCLASSES[cls]


# ------------------------------------------------------------------------------------------------ rotary
def _rope_function(backend: str | None) -> Callable:
    def apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1):
        """transformers' signature: q, k (batch, heads, seq, head_dim); cos, sin (batch, seq, head_dim), the two
        halves equal (cat(freqs, freqs), already scaled by the rope attention factor)."""
        if unsqueeze_dim != 1:
            raise ValueError(f"unsqueeze_dim: Sparrow's rotary patch handles 1 (heads before seq), got {unsqueeze_dim}")
        half = cos.shape[-1] // 2
        cos, sin = cos[..., :half], sin[..., :half]
        if cos.shape[0] == 1:  # the same positions for every row: (seq, half) tables
            cos, sin = cos[0], sin[0]
        q_out, k_out = ops.apply_rope(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(),
                                      cos.contiguous(), sin.contiguous(), backend=backend)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)

    apply_rotary_pos_emb._sparrow = True
    return apply_rotary_pos_emb


# ------------------------------------------------------------------------------------------------ attention
@dataclass(frozen=True)
class CausalMask:
    """What our mask function returns for plain causal attention over the whole input (no padding, no cache
    offset): ``packed`` when transformers found documents in the position ids (it then turns its causal skip
    off), so the attention splits them by position ids."""
    packed: bool


def _is_zero(offset: Any) -> bool:
    return isinstance(offset, int) and offset == 0


def _sparrow_mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: Any = 0,
                  mask_function: Callable | None = None, attention_mask: Tensor | None = None,
                  allow_is_causal_skip: bool = True, **kwargs: Any) -> Any:
    if attention_mask is None and q_length == kv_length and _is_zero(q_offset) and _is_zero(kv_offset):
        return CausalMask(packed=not allow_is_causal_skip)
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=allow_is_causal_skip, **kwargs)


def cu_seqlens_from_position_ids(position_ids: Tensor, batch: int, seq: int) -> Tensor:
    """Document boundaries over the flattened (batch * seq) tokens: a document starts at each row start and
    wherever the position does not follow the previous one by 1 (as transformers finds packed sequences)."""
    position_ids = position_ids.expand(batch, seq)
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    boundaries = starts.reshape(-1).nonzero().reshape(-1)
    total = torch.tensor([batch * seq], device=position_ids.device, dtype=boundaries.dtype)
    return torch.cat([boundaries, total]).to(torch.int32)


# The last forward's position ids (a weak reference, its version counter, batch and length) and the cu_seqlens found
# from them. Every layer's attention gets the same position_ids tensor, and finding the boundaries (nonzero) waits
# on the GPU: computed once per forward instead of once per layer.
_last_packing: tuple | None = None


def _packed_cu_seqlens(position_ids: Tensor, batch: int, seq: int) -> Tensor:
    global _last_packing
    if torch.compiler.is_compiling():
        return cu_seqlens_from_position_ids(position_ids, batch, seq)
    last = _last_packing
    if last is not None and last[0]() is position_ids and last[1:3] == (position_ids._version, (batch, seq)):
        return last[3]
    cu_seqlens = cu_seqlens_from_position_ids(position_ids, batch, seq)
    _last_packing = (weakref.ref(position_ids), position_ids._version, (batch, seq), cu_seqlens)
    return cu_seqlens


def _sparrow_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                       dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """transformers' attention-function signature: query (batch, heads, q_len, head_dim), key/value
    (batch, kv_heads, kv_len, head_dim); returns ((batch, q_len, heads, head_dim), None)."""
    if not isinstance(attention_mask, CausalMask) and attention_mask is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if dropout:
        raise ValueError(f"dropout: Sparrow's attention has none, got {dropout}")
    backend = getattr(module, "sparrow_backend", None)
    q, k, v = (t.transpose(1, 2).contiguous() for t in (query, key, value))
    b, t, h, d = q.shape
    position_ids = kwargs.get("position_ids")
    if isinstance(attention_mask, CausalMask) and attention_mask.packed and position_ids is not None:
        cu_seqlens = _packed_cu_seqlens(position_ids, b, t)
        out = ops.attention_varlen(q.reshape(b * t, h, d), k.reshape(b * t, -1, d), v.reshape(b * t, -1, d),
                                   cu_seqlens, t, causal=True, scale=scaling, backend=backend,
                                   check_seqlens=False)  # built just above: valid, no document longer than t
        return out.reshape(b, t, h, d), None
    return ops.attention(q, k, v, causal=True, scale=scaling, backend=backend), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, _sparrow_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _sparrow_mask)


# ------------------------------------------------------------------------------------------------ patch / undo
@dataclass
class TransformersPatch:
    """What :func:`patch_transformers` swapped; :meth:`undo` puts every piece back."""
    model: nn.Module
    backend: str | None
    norms: list[str] = field(default_factory=list)          # RMSNorm modules swapped
    fused_layers: list[str] = field(default_factory=list)   # decoder layers with the fused add + norm
    rotary: str | None = None                               # "<module>.apply_rotary_pos_emb"
    attention: str | None = None                            # the attention implementation replaced
    attention_modules: int = 0
    _classes: dict[str, type] = field(default_factory=dict, repr=False)  # module name -> original class
    _rope_original: Callable | None = field(default=None, repr=False)

    @property
    def swapped(self) -> dict[str, Any]:
        return {"rms_norm": len(self.norms), "fused_add_rms_norm": len(self.fused_layers), "rotary": self.rotary,
                "attention": self.attention_modules}

    def undo(self) -> nn.Module:
        modules = dict(self.model.named_modules())
        for name, cls in self._classes.items():
            modules[name].__class__ = cls
        for module in modules.values():
            if hasattr(module, "sparrow_backend"):
                del module.sparrow_backend
        if self.rotary is not None:
            module_name, attr = self.rotary.rsplit(".", 1)
            _ROPE_USERS[module_name] -= 1
            if _ROPE_USERS[module_name] == 0:
                setattr(importlib.import_module(module_name), attr, self._rope_original)
        if self.attention is not None:
            self.model.set_attn_implementation(self.attention)
        self.norms, self.fused_layers, self.rotary, self.attention, self.attention_modules = [], [], None, None, 0
        self._classes.clear()
        self.model._sparrow_patch = None
        return self.model


def patch_transformers(model: nn.Module, backend: str | None) -> TransformersPatch:
    """Swap Sparrow's RMSNorm, rotary and attention into ``model`` (a transformers model of a supported
    architecture); returns what was swapped, with ``undo()``."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model: transformers model_type {model_type!r} is not supported by sparrow.patch; "
                         f"supported: {sorted(ARCHITECTURES)}")
    sparrow_fields_from_hf(model.config.to_dict())  # refuses a config Sparrow's kernels would compute differently
    if getattr(model, "_sparrow_patch", None) is not None:
        model._sparrow_patch.undo()  # re-patching (e.g. another backend) starts from the original
    module_name, norm_name, layer_name = ARCHITECTURES[model_type]
    modeling = importlib.import_module(module_name)
    norm_cls, layer_cls = getattr(modeling, norm_name), getattr(modeling, layer_name)
    record = TransformersPatch(model=model, backend=backend)
    for name, module in model.named_modules():
        cls = type(module)
        if cls in (norm_cls, layer_cls):
            record._classes[name] = cls
            module.__class__ = _subclass(cls, _sparrow_rms_norm_forward if cls is norm_cls else _fused_decoder_layer_forward)
            module.sparrow_backend = backend
            (record.norms if cls is norm_cls else record.fused_layers).append(name)
        elif type(module).__name__.endswith("Attention") and hasattr(module, "scaling"):
            module.sparrow_backend = backend
            record.attention_modules += 1
    original_rope = modeling.apply_rotary_pos_emb
    while getattr(original_rope, "_sparrow", False):  # left by a patch of another model
        original_rope = original_rope._original
    rope = _rope_function(backend)
    rope._original = original_rope
    modeling.apply_rotary_pos_emb = rope
    _ROPE_USERS[module_name] = _ROPE_USERS.get(module_name, 0) + 1
    record.rotary, record._rope_original = f"{module_name}.apply_rotary_pos_emb", original_rope
    _register_attention()
    record.attention = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    model._sparrow_patch = record
    return record
