"""The ops layer's contract: argument checks for every backend, backend selection and fallback."""

import warnings

import pytest
import torch

import sparrow
from sparrow import ops
from sparrow.ops import registry


def test_reference_always_available():
    assert "reference" in ops.available_backends()
    assert set(ops.available_backends()) <= set(ops.BACKENDS)


def test_use_backend_nests_and_restores():
    assert ops.get_backend() == "auto"
    with ops.use_backend("reference"):
        assert ops.get_backend() == "reference"
        with ops.use_backend("auto"):
            assert ops.get_backend() == "auto"
        assert ops.get_backend() == "reference"
    assert ops.get_backend() == "auto"


def test_unknown_backend_names_the_argument():
    with pytest.raises(ValueError, match="backend"):
        ops.rms_norm(torch.ones(2, 4), torch.ones(4), backend="fastest")
    with pytest.raises(ValueError, match="backend"):
        with ops.use_backend("nope"):
            pass


def test_auto_on_cpu_is_the_reference():
    x, w = torch.randn(3, 8), torch.randn(8)
    assert torch.equal(ops.rms_norm(x, w), ops.reference.rms_norm(x, w))


def test_missing_backend_falls_back_with_one_clear_warning(monkeypatch):
    monkeypatch.setitem(registry._load_errors, "triton", "ModuleNotFoundError: No module named 'triton'")
    monkeypatch.setattr(registry, "_loaded", registry._loaded - {"triton"})
    monkeypatch.setattr(registry, "_warned", set())
    x, w = torch.randn(3, 8), torch.randn(8)
    with pytest.warns(UserWarning, match="'triton' is unavailable.*No module named 'triton'.*reference"):
        y = ops.rms_norm(x, w, backend="triton")
    torch.testing.assert_close(y, ops.reference.rms_norm(x, w))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.rms_norm(x, w, backend="triton")  # warned once per op and backend


def test_backend_without_the_op_falls_back(monkeypatch):
    monkeypatch.setattr(registry, "_warned", set())
    monkeypatch.setitem(registry._kernels, "rms_norm", {"reference": registry._kernels["rms_norm"]["reference"]})
    monkeypatch.setattr(registry, "_loaded", registry._loaded | {"cuda"})
    with pytest.warns(UserWarning, match="'cuda' has no kernel"):
        ops.rms_norm(torch.randn(2, 4), torch.ones(4), backend="cuda")


def test_auto_skips_a_backend_whose_check_rejects_the_input(monkeypatch):
    calls = []

    def picky_check(x, weight, eps):
        raise ValueError("x: not for me")

    monkeypatch.setitem(registry._kernels, "rms_norm", dict(registry._kernels["rms_norm"]))
    registry._kernels["rms_norm"]["cuda"] = registry.Kernel(lambda *a: calls.append(a), picky_check)
    # Only cuda and the reference: the triton kernel would otherwise take this CPU tensor under the interpreter.
    registry._kernels["rms_norm"].pop("triton", None)
    monkeypatch.setattr(registry, "_loaded", registry._loaded | {"cuda"})
    x = torch.randn(2, 4)
    fn = registry.resolve("rms_norm", "auto", torch.device("cuda"), (x, torch.ones(4), 1e-6))
    assert fn is registry._kernels["rms_norm"]["reference"].fn
    with pytest.raises(ValueError, match="x: not for me"):  # asked for explicitly: the reason surfaces
        registry.resolve("rms_norm", "cuda", torch.device("cuda"), (x, torch.ones(4), 1e-6))
    assert not calls


@pytest.mark.parametrize(
    "call,argument",
    [
        (lambda: ops.rms_norm(torch.randn(2, 8), torch.randn(7)), "weight"),
        (lambda: ops.rms_norm(torch.randint(0, 3, (2, 8)), torch.randn(8)), "x"),
        (lambda: ops.rms_norm(torch.randn(2, 8), torch.randn(8), eps=0.0), "eps"),
        (lambda: ops.fused_add_rms_norm(torch.randn(2, 8), torch.randn(2, 7), torch.randn(8)), "residual"),
        (lambda: ops.apply_rope(torch.randn(2, 3, 4, 8), torch.randn(2, 3, 2, 8), torch.randn(3, 4), torch.randn(3, 3)), "sin"),
        (lambda: ops.apply_rope(torch.randn(2, 3, 4, 8), torch.randn(2, 3, 2, 8), torch.randn(3, 5), torch.randn(3, 5)), "cos"),
        (lambda: ops.apply_rope(torch.randn(2, 3, 4, 8), torch.randn(2, 4, 2, 8), torch.randn(3, 4), torch.randn(3, 4)), "k"),
        (lambda: ops.apply_rope(torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 4), torch.randn(3, 4)), "q"),
        (lambda: ops.attention(torch.randn(1, 4, 4, 8), torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8)), "kv_heads"),
        (lambda: ops.attention(torch.randn(1, 4, 4, 8), torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16)), "head_dim"),
        (lambda: ops.attention(torch.randn(1, 5, 4, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)), "q_len"),
        (lambda: ops.attention(torch.randn(1, 4, 4, 8), torch.randn(1, 4, 2, 8).half(), torch.randn(1, 4, 2, 8)), "dtype"),
        (lambda: ops.attention_varlen(*_packed(), torch.tensor([0, 3, 6], dtype=torch.int64), 3), "cu_seqlens"),
        (lambda: ops.attention_varlen(*_packed(), torch.tensor([0, 4, 2, 6], dtype=torch.int32), 4), "non-decreasing"),
        (lambda: ops.attention_varlen(*_packed(), torch.tensor([0, 3, 7], dtype=torch.int32), 4), "exceeds"),
        (lambda: ops.attention_varlen(*_packed(), torch.tensor([0, 1, 6], dtype=torch.int32), 3), "max_seqlen"),
    ],
)
def test_bad_input_is_a_value_error_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


def _packed():
    return torch.randn(6, 4, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8)


def test_patch_validates_and_sets_every_module():
    model = sparrow.SparrowForCausalLM(sparrow.SparrowConfig.from_preset("tiny", num_hidden_layers=1))
    sparrow.patch(model, "reference")
    assert model.backend == "reference"
    assert all(m.backend == "reference" for m in model.modules() if hasattr(m, "backend") and m is not model)
    with pytest.raises(ValueError, match="backend"):
        sparrow.patch(model, "fast")
