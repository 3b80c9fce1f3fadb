"""Registers the pure-PyTorch references as the "reference" backend (always available)."""

from . import reference
from .registry import register

register("rms_norm", "reference", reference.rms_norm)
register("fused_add_rms_norm", "reference", reference.fused_add_rms_norm)
register("apply_rope", "reference", reference.apply_rope)
register("attention", "reference", reference.attention)
register("attention_varlen", "reference", reference.attention_varlen)
register("attention_with_kv_cache", "reference", reference.attention_with_kv_cache)
register("moe_experts", "reference", reference.moe_experts)
