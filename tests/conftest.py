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
