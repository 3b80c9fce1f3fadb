"""Translate a Hugging Face ``config.json`` of the Llama family to Sparrow's config fields, and back.

Supported ``model_type``s: llama, mistral, qwen2, qwen3 (all: pre-norm RMSNorm decoder, GQA attention with
rotate-half RoPE, SwiGLU MLP). Their differences are Sparrow config fields: ``qkv_bias`` / ``o_bias`` (Qwen2 has
q/k/v bias only; Llama's and Qwen3's ``attention_bias`` biases all four projections), ``qk_norm`` (Qwen3's
per-head RMSNorm of q and k before RoPE), an explicit ``head_dim``, and ``rope_scaling`` (llama3, linear, dynamic,
yarn, computed as transformers' ``modeling_rope_utils``).

Two mixture-of-experts architectures share that frame: mixtral (every MLP a mixture of ``num_local_experts``
experts of ``intermediate_size``, top-k renormalised) and qwen3_moe (Qwen3's attention; experts of
``moe_intermediate_size``, ``norm_topk_prob``, MoE every ``decoder_sparse_step`` layers less ``mlp_only_layers``,
whose dense MLPs use ``intermediate_size``). Sparrow holds the Qwen3-MoE fields; Mixtral's map onto them.
Qwen2-MoE's shared expert is not implemented, so its fields are refused as unknown.

Every field is classified: translated, known not to change the computation (ids, dtype, cache use...), or
refused with a ``ValueError`` naming it and its value. An unknown field is refused too, since Sparrow cannot
tell whether it changes the math. Sliding-window attention is exact to drop when the window covers
``max_position_embeddings`` (a query at position p sees keys p - window < k <= p, and Sparrow refuses inputs
longer than ``max_position_embeddings``); a smaller window is refused.
"""

from __future__ import annotations

from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")
MOE_MODEL_TYPES = ("mixtral", "qwen3_moe")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}

# rope_type -> the keys transformers reads for it (besides rope_type and rope_theta).
ROPE_KEYS: dict[str, set[str]] = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "original_max_position_embeddings", "truncate"},
}

# Fields copied as they are (Sparrow's names are Hugging Face's).
_COPIED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "initializer_range",
           "bos_token_id", "eos_token_id", "pad_token_id")

# Fields that do not change the logits or the gradients of a forward pass.
_HARMLESS = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "use_cache", "_name_or_path",
    "id2label", "label2id", "output_attentions", "output_hidden_states", "return_dict", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "finetuning_task", "tf_legacy_loss", "use_bfloat16",
    "torchscript", "pruned_heads", "cross_attention_hidden_size", "add_cross_attention", "is_decoder",
    "_attn_implementation", "_attn_implementation_autoset", "initializer_range", "max_window_layers",
    "pretraining_tp",  # transformers 5 no longer reads it (it only split matmuls, same math)
    "output_router_logits",  # whether transformers computes the balancing loss; Sparrow does when training
}


def _refuse(field: str, value: Any, why: str) -> None:
    raise ValueError(f"config.json: {field}={value!r} is not supported: {why}")


def _rope_fields(hf: dict[str, Any], head_dim: int) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in ROPE_KEYS:
        _refuse("rope_scaling.rope_type", rope_type, f"Sparrow implements {sorted(ROPE_KEYS)}")
    partial = params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial is not None and int(head_dim * partial) != head_dim:
        _refuse("partial_rotary_factor", partial, "these architectures rotate the whole head")
    unknown = sorted(set(params) - ROPE_KEYS[rope_type])
    if unknown:
        _refuse(f"rope_scaling.{unknown[0]}", params[unknown[0]], f"not a parameter of rope_type {rope_type!r}")
    if rope_type == "default":
        return theta, None
    if rope_type in ("llama3", "yarn"):
        # transformers fills it in the same way when absent
        params.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
    return theta, {"rope_type": rope_type, **params}


def _check_sliding_window(hf: dict[str, Any], model_type: str) -> None:
    window = hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3", "qwen3_moe"):
        layer_types = hf.get("layer_types") or []
        sliding = hf.get("use_sliding_window", False) and window is not None and (
            "sliding_attention" in layer_types
            or (not layer_types and hf.get("max_window_layers", 28) < hf["num_hidden_layers"]))
        if not sliding:
            return
    elif "layer_types" in hf and any(t != "full_attention" for t in hf["layer_types"]):
        _refuse("layer_types", hf["layer_types"], "Sparrow runs full attention in every layer")
    if window is not None and window < hf["max_position_embeddings"]:
        _refuse("sliding_window", window, f"a window shorter than max_position_embeddings ({hf['max_position_embeddings']}) "
                "changes attention within the usable length")


def sparrow_fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """Sparrow config fields (``SparrowConfig(**fields)``) for a Hugging Face config dict."""
    model_type = hf.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        _refuse("model_type", model_type, f"Sparrow loads {list(SUPPORTED_MODEL_TYPES)}")
    if hf.get("hidden_act", "silu") != "silu":
        _refuse("hidden_act", hf["hidden_act"], "Sparrow's MLP is SwiGLU (silu)")
    if hf.get("mlp_bias", False):
        _refuse("mlp_bias", hf["mlp_bias"], "Sparrow's MLP has no bias")
    if hf.get("attention_dropout", 0.0):
        _refuse("attention_dropout", hf["attention_dropout"], "Sparrow's attention has no dropout")
    if "quantization_config" in hf:
        _refuse("quantization_config", hf["quantization_config"], "load the full-precision weights")
    _check_sliding_window(hf, model_type)

    fields = {name: hf[name] for name in _COPIED if name in hf}
    fields["num_key_value_heads"] = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    default_head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    fields["head_dim"] = hf.get("head_dim") or default_head_dim
    fields["rope_theta"], fields["rope_scaling"] = _rope_fields(hf, fields["head_dim"])
    if model_type == "qwen2":
        fields["qkv_bias"], fields["o_bias"] = True, False
    else:
        fields["qkv_bias"] = fields["o_bias"] = bool(hf.get("attention_bias", False))
    fields["qk_norm"] = model_type in ("qwen3", "qwen3_moe")
    fields["model_type"] = model_type
    moe_keys = _moe_fields(hf, model_type, fields)

    translated = set(_COPIED) | moe_keys | {"num_key_value_heads", "head_dim", "rope_theta", "rope_scaling", "rope_parameters",
                                 "partial_rotary_factor", "attention_bias", "hidden_act", "mlp_bias",
                                 "attention_dropout", "sliding_window", "use_sliding_window", "layer_types"}
    unknown = sorted(set(hf) - translated - _HARMLESS)
    if unknown:
        _refuse(unknown[0], hf[unknown[0]], "Sparrow does not know whether this field changes the computation")
    return fields


def _moe_fields(hf: dict[str, Any], model_type: str, fields: dict[str, Any]) -> set[str]:
    """Fill the mixture-of-experts fields of a mixtral / qwen3_moe config; returns the keys it translated."""
    if model_type not in MOE_MODEL_TYPES:
        return set()
    if hf.get("router_jitter_noise", 0.0):
        _refuse("router_jitter_noise", hf["router_jitter_noise"], "Sparrow's router adds no noise")
    # transformers 5 writes Qwen3-MoE's num_experts as num_local_experts (an attribute alias); accept both.
    experts = hf.get("num_local_experts", hf.get("num_experts"))
    fields.update(num_local_experts=experts, num_experts_per_tok=hf.get("num_experts_per_tok", 2),
                  router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
                  router_z_loss_coef=hf.get("router_z_loss_coef", 0.0))
    if model_type == "mixtral":
        fields.update(moe_intermediate_size=hf["intermediate_size"], norm_topk_prob=True)
    else:
        fields.update(moe_intermediate_size=hf["moe_intermediate_size"], norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                      decoder_sparse_step=hf.get("decoder_sparse_step", 1), mlp_only_layers=list(hf.get("mlp_only_layers") or []))
    return {"num_local_experts", "num_experts", "num_experts_per_tok", "router_aux_loss_coef", "router_z_loss_coef",
            "router_jitter_noise", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"}


def _check_expressible(fields: dict[str, Any], model_type: str) -> None:
    """Refuse, by field, a Sparrow config the target architecture cannot hold."""
    experts = fields.get("num_local_experts", 0)
    if model_type not in MOE_MODEL_TYPES:
        if experts:
            raise ValueError(f"model_type: {model_type} has no experts; a model with num_local_experts={experts} "
                             f"exports as one of {list(MOE_MODEL_TYPES)}")
        return
    if not experts:
        raise ValueError(f"model_type: {model_type} needs num_local_experts > 0")
    if model_type == "mixtral":
        if not fields.get("norm_topk_prob", True):
            raise ValueError("norm_topk_prob: mixtral always renormalises the top-k weights; use model_type qwen3_moe")
        if fields.get("decoder_sparse_step", 1) != 1 or fields.get("mlp_only_layers"):
            raise ValueError("decoder_sparse_step / mlp_only_layers: mixtral has experts in every layer; use qwen3_moe")


def hf_config_from_sparrow(fields: dict[str, Any]) -> dict[str, Any]:
    """The Hugging Face config dict of Sparrow config ``fields``, in their ``model_type``'s own format
    (``rope_theta`` + ``rope_scaling``, which transformers 4 and 5 both read)."""
    model_type = fields.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        _refuse("model_type", model_type, f"Sparrow writes {list(SUPPORTED_MODEL_TYPES)}")
    qkv, o, qk_norm = fields.get("qkv_bias", False), fields.get("o_bias", False), fields.get("qk_norm", False)
    if model_type == "qwen2":
        if not qkv or o or qk_norm:
            raise ValueError(f"model_type: qwen2 needs qkv_bias=True, o_bias=False, qk_norm=False; got {qkv}, {o}, {qk_norm}")
    else:
        if qkv != o:
            raise ValueError(f"model_type: {model_type} biases all four attention projections or none; got qkv_bias={qkv}, o_bias={o}")
        if qk_norm != (model_type in ("qwen3", "qwen3_moe")):
            raise ValueError(f"model_type: qk_norm={qk_norm} is not expressible in {model_type} (only qwen3 and qwen3_moe have it)")
        if model_type == "mixtral" and qkv:
            raise ValueError("model_type: mixtral has no attention bias; got qkv_bias=True")
    _check_expressible(fields, model_type)
    hf = {name: fields[name] for name in _COPIED if name in fields}
    hf.update(model_type=model_type, architectures=[ARCHITECTURES[model_type]], hidden_act="silu",
              num_key_value_heads=fields["num_key_value_heads"], head_dim=fields["head_dim"],
              rope_theta=fields["rope_theta"], rope_scaling=fields.get("rope_scaling"), attention_dropout=0.0)
    if model_type in ("llama", "qwen3"):
        hf["attention_bias"] = qkv
    if model_type == "llama":
        hf["mlp_bias"] = False
    if model_type == "mistral":
        hf["sliding_window"] = None  # MistralConfig defaults to 4096 when the key is absent
    if model_type in ("qwen2", "qwen3", "qwen3_moe"):
        hf.update(use_sliding_window=False, sliding_window=None)
    if model_type in MOE_MODEL_TYPES:
        hf.update(num_experts_per_tok=fields["num_experts_per_tok"], router_aux_loss_coef=fields["router_aux_loss_coef"],
                  router_z_loss_coef=fields.get("router_z_loss_coef", 0.0), output_router_logits=False)
    if model_type == "mixtral":
        hf.update(num_local_experts=fields["num_local_experts"], intermediate_size=fields["moe_intermediate_size"],
                  router_jitter_noise=0.0, sliding_window=None)
    if model_type == "qwen3_moe":
        hf.update(num_experts=fields["num_local_experts"], moe_intermediate_size=fields["moe_intermediate_size"],
                  norm_topk_prob=fields["norm_topk_prob"], decoder_sparse_step=fields["decoder_sparse_step"],
                  mlp_only_layers=list(fields["mlp_only_layers"]), attention_bias=qkv)
    return hf
