"""A tiny Sparrow model trained a few steps with each available backend follows the reference's loss curve.

Per-op conformance (tests/test_backends.py) cannot catch a kernel that is right in isolation but wired wrongly
into the model (a gradient dropped by the autograd glue, a saved tensor reused after an in-place update);
training end to end can. On CPU the triton backend runs under the interpreter, so the model is tiny.

The model trains in float32, which the attention kernels do not take (they are bf16/fp16 and have their own
error-bound tests), so attention runs on the reference here: the curves compare the norm and RoPE kernels.
"""

import warnings

import pytest
import torch

from sparrow import ops
from sparrow.model import SparrowConfig, SparrowForCausalLM

from conftest import HAS_CUDA

DEVICE = "cuda" if HAS_CUDA else "cpu"
STEPS = 20


def train(backend: str) -> list[float]:
    torch.manual_seed(0)
    config = SparrowConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = SparrowForCausalLM(config, backend=backend).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    # A learnable sequence (each token predicts the next of a fixed cycle), two packed documents in one row:
    # positions restart mid-row, which exercises the per-token cos/sin path.
    cycle = torch.randperm(64, generator=gen)
    ids = cycle[torch.arange(16) % 64].unsqueeze(0).to(DEVICE)
    cu_seqlens = torch.tensor([0, 7, 16], dtype=torch.int32, device=DEVICE)
    losses = []
    for _ in range(STEPS):
        loss = model(ids, labels=ids, cu_seqlens=cu_seqlens, max_seqlen=9).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def reference_losses():
    return train("reference")


@pytest.fixture
def reference_attention(monkeypatch):
    for name in ("attention", "attention_varlen"):
        ref = getattr(ops.reference, name)
        # backend and check_seqlens are the ops layer's, not the reference function's.
        monkeypatch.setattr(ops, name, lambda *args, backend=None, check_seqlens=True, _ref=ref, **kwargs:
                            _ref(*args, **kwargs))


# Ids other than a bare "cuda", which conftest reads as the GPU-only marker: on CPU the cuda backend runs the
# native CPU kernels and must be tested.
@pytest.mark.parametrize("backend", [pytest.param("triton", id="triton-backend"), pytest.param("cuda", id="cuda-backend")])
def test_training_matches_reference(backend, reference_losses, reference_attention):
    error = ops.backend_error(backend)
    if error is not None:
        pytest.skip(f"backend {backend} unavailable: {error}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback notice for ops this backend lacks
        losses = train(backend)
    assert reference_losses[-1] < 0.7 * reference_losses[0], "the reference run did not learn; the test is vacuous"
    # float32 kernels with float32 accumulation: the curves agree to rounding, amplified a little by AdamW.
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), atol=2e-3, rtol=2e-3)
