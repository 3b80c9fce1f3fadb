"""Hugging Face interoperability: Llama-family checkpoints in and out, and Sparrow's kernels in transformers models.

- :mod:`sparrow.hf.config`: config.json of llama / mistral / qwen2 / qwen3 <-> Sparrow's config fields; every
  field that changes the computation is implemented or refused by name.
- :mod:`sparrow.hf.patching`: :func:`sparrow.patch` for transformers models (norms, rotary, attention).

Nothing here imports :mod:`sparrow.model`: the model calls these (imports flow ops <- hf.config <- model); weights are read by
:mod:`sparrow.safetensors_io`, sharded folders included.
"""
