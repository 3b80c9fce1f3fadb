"""Sparrow: train small Llama-style language models from scratch, fast.

``import sparrow`` needs only PyTorch. The compiled parts (``sparrow._bpe``, the C++ BPE encoder, and
``sparrow._C``, the CUDA kernels) and Triton are loaded on first use; where one is missing, the ops fall back
to the pure-PyTorch references with a message saying why.
"""

__version__ = "0.1.0"

from . import ops
from .model import PRESETS, CausalLMOutput, SparrowConfig, SparrowForCausalLM, patch

__all__ = ["CausalLMOutput", "PRESETS", "SparrowConfig", "SparrowForCausalLM", "ops", "patch", "__version__"]
