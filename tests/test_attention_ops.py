"""Attention-specific tests beyond the shared conformance suite (tests/test_backends.py): KV-cache decoding,
the custom ops' registrations (opcheck), torch.compile, and argument errors."""

from __future__ import annotations

import warnings

import pytest
import torch

from sparrow import ops
from sparrow.ops import reference
from sparrow.testing import max_error

from conftest import HAS_CUDA, triton_module
from test_backends import DEVICE, FAST_BACKENDS, check_attention_error, require_kernel


def _decode_against_prefix(backend, heads, kv_heads, prompt_lens, steps, head_dim=64, dtype=torch.bfloat16):
    """Prefill right-padded prompts of different lengths, then decode ``steps`` tokens one at a time; every
    output must equal plain causal attention over that row's prefix."""
    batch, max_len = len(prompt_lens), max(prompt_lens) + steps + 3
    total = max(prompt_lens) + steps
    keys = torch.randn(batch, total, kv_heads, head_dim, device=DEVICE).to(dtype)
    values = torch.randn(batch, total, kv_heads, head_dim, device=DEVICE).to(dtype)
    queries = torch.randn(batch, total, heads, head_dim, device=DEVICE).to(dtype)
    # Garbage past each row's length must never be read.
    k_cache = torch.full((batch, max_len, kv_heads, head_dim), 1e4, device=DEVICE).to(dtype)
    v_cache = torch.full((batch, max_len, kv_heads, head_dim), float("nan"), device=DEVICE).to(dtype)
    lengths = torch.tensor(prompt_lens, dtype=torch.int32, device=DEVICE)

    # Prefill: every row gets its prompt; rows are processed with the longest prompt's query count, so
    # shorter rows prefill their own prompt separately (as generation does with right padding).
    for b, n in enumerate(prompt_lens):
        k_cache[b, :n], v_cache[b, :n] = keys[b, :n], values[b, :n]
    n_min = min(prompt_lens)
    q_prefill = torch.stack([queries[b, n - n_min:n] for b, n in enumerate(prompt_lens)])
    require_kernel("attention_with_kv_cache", backend, q_prefill, k_cache, v_cache, lengths, None)
    outs = [(ops.attention_with_kv_cache(q_prefill, k_cache, v_cache, lengths, backend=backend), lengths.clone(), n_min)]
    for _ in range(steps):
        for b in range(batch):
            pos = int(lengths[b])
            k_cache[b, pos], v_cache[b, pos] = keys[b, pos], values[b, pos]
        lengths = lengths + 1
        q_step = torch.stack([queries[b, int(lengths[b]) - 1:int(lengths[b])] for b in range(batch)])
        outs.append((ops.attention_with_kv_cache(q_step, k_cache, v_cache, lengths, backend=backend), lengths.clone(), 1))

    for out, lens, new in outs:
        for b in range(batch):
            n = int(lens[b])
            q_b, k_b, v_b = queries[b:b + 1, n - new:n], keys[b:b + 1, :n], values[b:b + 1, :n]
            exact = reference.attention(q_b.float(), k_b.float(), v_b.float(), True)
            lowp = reference.attention(q_b, k_b, v_b, True, upcast=False)
            check_attention_error(out[b:b + 1], lowp, exact, f"row {b} at length {n}")


@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (4, 1)])
def test_decode_matches_full_attention_on_prefix(backend, heads, kv_heads):
    _decode_against_prefix(backend, heads, kv_heads, prompt_lens=[5, 1, 19], steps=3 if not HAS_CUDA else 40)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_decode_long_cache_splits(backend):
    """One token against a long cache: the split-KV path with several chunks and a merge."""
    dtype = torch.bfloat16
    lens = torch.tensor([300, 7, 129], dtype=torch.int32, device=DEVICE)
    k_cache = torch.randn(3, 320, 2, 64, device=DEVICE).to(dtype)
    v_cache = torch.randn(3, 320, 2, 64, device=DEVICE).to(dtype)
    q = torch.randn(3, 1, 8, 64, device=DEVICE).to(dtype)
    require_kernel("attention_with_kv_cache", backend, q, k_cache, v_cache, lens, None)
    fast = ops.attention_with_kv_cache(q, k_cache, v_cache, lens, backend=backend)
    exact = reference.attention_with_kv_cache(q.float(), k_cache.float(), v_cache.float(), lens)
    lowp = reference.attention_with_kv_cache(q, k_cache, v_cache, lens, upcast=False)
    check_attention_error(fast, lowp, exact, "out")


def test_reference_decode_equals_attention_when_cache_is_full():
    q = torch.randn(2, 3, 4, 32)
    k, v = torch.randn(2, 10, 2, 32), torch.randn(2, 10, 2, 32)
    lens = torch.tensor([10, 10], dtype=torch.int32)
    torch.testing.assert_close(reference.attention_with_kv_cache(q, k, v, lens), reference.attention(q, k, v, True))


# ---------------------------------------------------------------------------------------------- opcheck
def _triton_or_skip():
    return triton_module("triton_attention")


def _opcheck(op, args):
    # test_aot_dispatch_dynamic re-traces with symbolic shapes, which the interpreter makes very slow on CPU.
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    if HAS_CUDA:
        tests = (*tests, "test_aot_dispatch_dynamic")
    torch.library.opcheck(op, args, test_utils=tests)


def test_opcheck_triton_attention():
    ta = _triton_or_skip()
    q = torch.randn(1, 9, 4, 32, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 9, 2, 32, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 9, 2, 32, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    _opcheck(ta._fwd, (q, k, v, True, 0.2))
    o, lse = ta._fwd(q, k, v, True, 0.2)
    # lse.detach(): the saved statistics are an input of the backward, not something to differentiate through
    # (opcheck's AOT test would otherwise ask for the backward's own backward).
    _opcheck(ta._bwd, (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(), True, 0.2))


def test_opcheck_triton_varlen_and_decode():
    ta = _triton_or_skip()
    cu = torch.tensor([0, 3, 4, 11], dtype=torch.int32, device=DEVICE)
    q = torch.randn(11, 4, 32, device=DEVICE, dtype=torch.float16, requires_grad=True)
    k = torch.randn(11, 1, 32, device=DEVICE, dtype=torch.float16, requires_grad=True)
    v = torch.randn(11, 1, 32, device=DEVICE, dtype=torch.float16, requires_grad=True)
    _opcheck(ta._varlen_fwd, (q, k, v, cu, 7, False, 0.3))
    qc = torch.randn(2, 1, 4, 32, device=DEVICE, dtype=torch.float16)
    kc, vc = (torch.randn(2, 20, 2, 32, device=DEVICE, dtype=torch.float16) for _ in range(2))
    _opcheck(ta._kvcache, (qc, kc, vc, torch.tensor([20, 3], dtype=torch.int32, device=DEVICE), 0.2))



@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_opcheck_cuda_attention():
    if not torch._C._dispatch_has_kernel_for_dispatch_key("sparrow_C::attention_fwd", "CUDA"):
        pytest.skip("sparrow._C was built without the attention kernels")
    q = torch.randn(2, 70, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 90, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 90, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    _opcheck(torch.ops.sparrow_C.attention_fwd.default, (q, k, v, True, 0.125))
    o, lse = torch.ops.sparrow_C.attention_fwd(q, k, v, True, 0.125)
    args = (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(), True, 0.125)
    _opcheck(torch.ops.sparrow_C.attention_bwd.default, args)

def test_compile_triton_attention_fullgraph():
    _triton_or_skip()
    q, k, v = (torch.randn(1, 12, 2, 32, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def step(q, k, v):
        return ops.attention(q, k, v, True, backend="triton").float().square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    eager_loss = step(q, k, v)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v))
    assert max_error(loss, eager_loss) == 0
    for g, e in zip(grads, eager_grads):
        assert max_error(g, e) == 0


# --------------------------------------------------------------------------------------------- bad input
def _qkv(heads=4, kv_heads=2, head_dim=64, dtype=torch.bfloat16, t=8):
    return (torch.randn(1, t, heads, head_dim, device=DEVICE).to(dtype),
            torch.randn(1, t, kv_heads, head_dim, device=DEVICE).to(dtype),
            torch.randn(1, t, kv_heads, head_dim, device=DEVICE).to(dtype))


def test_mismatched_heads_is_value_error():
    q, k, v = _qkv(heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="kv_heads"):
        ops.attention(q, k, v)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_kernel_limits_raise_and_auto_falls_back(backend):
    if ops.backend_error(backend) is not None:
        pytest.skip(f"{backend} unavailable")
    from sparrow.ops import registry

    kernel = registry._kernels["attention"].get(backend)
    if kernel is None:
        pytest.skip(f"{backend} has no attention kernel")
    for bad in (_qkv(head_dim=40), _qkv(dtype=torch.float32)):
        with pytest.raises(ValueError):
            kernel.check(*bad, True, None)
        # "auto" must still produce the right answer through a backend that takes the input.
        out = ops.attention(*bad, True, backend="auto")
        torch.testing.assert_close(out, reference.attention(*bad, True))


def test_cu_seqlens_errors():
    q = torch.randn(6, 2, 32)
    for cu, match in ((torch.tensor([0, 4, 2, 6], dtype=torch.int32), "non-decreasing"),
                      (torch.tensor([1, 3, 6], dtype=torch.int32), "start at 0"),
                      (torch.tensor([0, 3, 9], dtype=torch.int32), "exceeds the 6 tokens"),
                      (torch.tensor([0, 1, 6], dtype=torch.int32), "shorter than the longest document \\(5\\)"),
                      (torch.tensor([0, 3, 6], dtype=torch.int64), "int32")):
        with pytest.raises(ValueError, match=match):
            ops.attention_varlen(q, q, q, cu, 4)
    # A model checks them once per forward; its layers then skip the check (a host sync each).
    from sparrow import SparrowConfig, SparrowForCausalLM

    model = SparrowForCausalLM(SparrowConfig.from_preset("tiny", vocab_size=64), backend="reference")
    with pytest.raises(ValueError, match="non-decreasing"):
        model(torch.zeros(1, 6, dtype=torch.long), cu_seqlens=torch.tensor([0, 4, 2, 6], dtype=torch.int32),
              max_seqlen=4)


def test_kv_cache_errors():
    q = torch.randn(2, 3, 4, 32)
    kc = torch.randn(2, 10, 2, 32)
    with pytest.raises(ValueError, match="int32"):
        ops.attention_with_kv_cache(q, kc, kc, torch.tensor([5, 5]))
    with pytest.raises(ValueError, match="new_len"):
        ops.attention_with_kv_cache(q, kc, kc, torch.tensor([5, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="kv_heads"):
        ops.attention_with_kv_cache(q, torch.randn(2, 10, 3, 32), torch.randn(2, 10, 3, 32),
                                    torch.tensor([5, 5], dtype=torch.int32))


def test_cuda_attention_layout_check_traces_with_fake_tensors():
    """The cuda backend's 16-byte layout check runs in its forward and backward; under torch.compile (and
    opcheck's AOT test) the tensors are fakes without a data pointer, which failed on an H200."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sparrow.ops import cuda_attention

    if not hasattr(cuda_attention, "_vectors"):
        pytest.skip("sparrow._C was built without the attention kernels")
    # A data_ptr() of a fake is an error on the GPU builds and a deprecation warning on others: fail on both.
    with FakeTensorMode(), warnings.catch_warnings():
        warnings.simplefilter("error")
        t = torch.empty(2, 16, 4, 64, dtype=torch.bfloat16)
        assert cuda_attention._vectors(t) is t
        shifted = torch.empty(2 * 16 * 4 * 64 + 1, dtype=torch.bfloat16)[1:].view(2, 16, 4, 64)  # 2 bytes off
        assert not cuda_attention._vector_friendly(shifted)
        copied = cuda_attention._vectors(shifted)
        assert copied is not shifted and copied.storage_offset() == 0
    real = torch.empty(2 * 16 * 4 * 64 + 8, dtype=torch.bfloat16)
    assert cuda_attention._vector_friendly(real[8:].view(2, 16, 4, 64))  # 16 bytes off: still aligned
    assert not cuda_attention._vector_friendly(real[4:-4].view(2, 16, 4, 64))
