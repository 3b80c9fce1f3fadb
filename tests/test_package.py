"""Packaging promises: sparrow imports and trains without its compiled parts; the CLI reports what is built."""

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REQUIRE_EXTENSIONS


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300)


def test_import_and_train_without_extensions_or_triton():
    # Blocking the imports (None in sys.modules) is what a machine without a compiler or Triton looks like.
    result = run_python(
        """
        import sys
        for name in ("sparrow._C", "sparrow._bpe", "triton"):
            sys.modules[name] = None
        import torch, sparrow
        from sparrow import ops
        assert ops.available_backends() == ["reference"], ops.available_backends()
        assert "import" in ops.backend_error("cuda").lower()
        model = sparrow.SparrowForCausalLM(sparrow.SparrowConfig.from_preset("tiny", num_hidden_layers=1), backend="cuda")
        ids = torch.randint(0, 100, (1, 8))
        model(ids, labels=ids).loss.backward()
        print("trained")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "trained" in result.stdout
    # The fallback says which backend is missing and why, once per op.
    assert "backend 'cuda' is unavailable" in result.stderr and "falling back to the reference" in result.stderr


def test_extensions_are_built_where_required():
    if not REQUIRE_EXTENSIONS:
        pytest.skip("SPARROW_REQUIRE_EXTENSIONS is not set")
    import sparrow._bpe  # noqa: F401
    import sparrow._C  # noqa: F401


def test_cli_info_lists_backends():
    result = subprocess.run([sys.executable, "-m", "sparrow", "info"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for word in ("torch", "sparrow._bpe", "sparrow._C", "backend reference", "backend triton", "backend cuda"):
        assert word in result.stdout
