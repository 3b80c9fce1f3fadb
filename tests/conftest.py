import importlib
import os

import pytest
import torch

# Triton runs kernels on the CPU only through its interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
# CI sets this so a missing extension fails the run instead of skipping its tests.
REQUIRE_EXTENSIONS = os.environ.get("SPARROW_REQUIRE_EXTENSIONS") == "1"


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


def triton_module(name):
    """``sparrow.ops.<name>``, or skip the test with the reason when the triton backend does not load."""
    from sparrow import ops

    error = ops.backend_error("triton")
    if error is not None:
        pytest.skip(f"triton backend unavailable: {error}")
    return importlib.import_module(f"sparrow.ops.{name}")


def assert_compiled_matches_eager(f, leaves, *, atol, rtol):
    """``f(*leaves)`` (a scalar) captured in one graph (fullgraph; aot_eager keeps the check independent of
    inductor's CPU codegen) gives eager's value and the same gradient for every leaf."""
    compiled_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*compiled_leaves)
    compiled.backward()
    eager_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    eager = f(*eager_leaves)
    eager.backward()
    torch.testing.assert_close(compiled, eager, atol=atol, rtol=rtol)
    for got, ref in zip(compiled_leaves, eager_leaves):
        torch.testing.assert_close(got.grad, ref.grad, atol=atol, rtol=rtol)


class ByteTokenizer:
    """A tokenizer whose ids are the UTF-8 bytes: enough for tests of generation and evaluation logic."""

    def encode(self, text, allowed_special=None):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode(errors="replace")

    def token_to_id(self, token):
        return None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def write_sft_config(tmp_path, init_from, *, max_steps: int) -> dict:
    """Writes ``tmp_path/sft.yaml``, a `sparrow sft` config for a tiny run from ``init_from`` on
    ``tmp_path/sft.jsonl`` into ``tmp_path/sft`` (reference backend, no evaluation, saving or plots), and returns it
    as a dict for follow-up stages: the Hugging Face fine-tuning tests' shared setup."""
    import yaml

    stage = {"model": {"init_from": str(init_from), "backend": "reference"},
             "data": {"seq_len": 64, "micro_batch_size": 4},
             "train": {"out_dir": str(tmp_path / "sft"), "max_steps": max_steps, "warmup_steps": 1, "lr": 1e-2,
                       "eval_every": 0, "save_every": 0, "progress": False, "plot": False},
             "sft": {"data": str(tmp_path / "sft.jsonl")}}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(stage))
    return stage
