"""The package's layering: no import cycle between modules of ``sparrow/`` (counting imports inside
functions, which are cycles too, only deferred), nor between its subpackages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sparrow"


def _module_name(path: Path) -> str:
    parts = ("sparrow",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the sparrow modules it imports anywhere in its body, function bodies included."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` imports pkg.mod (and runs pkg/__init__, which is not counted: importing
                # a submodule through its package is how packages work); `from mod import name` imports mod.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                while target and target not in files:  # sparrow.x.y.z -> the nearest module that exists
                    target = target.rpartition(".")[0]
                if target.startswith("sparrow") and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's ``__init__`` re-exports its modules, and its modules import siblings through it now and
    then; that is one unit, not a cycle. Edges from a module to its own package's ``__init__`` are dropped."""
    return {m: {t for t in targets if not (m.startswith(t + ".") and t != "sparrow")} for m, targets in graph.items()}


def test_no_cycle_between_modules():
    cycle = find_cycle(_without_package_inits(import_graph()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_cycle_between_subpackages():
    def unit(module: str) -> str:
        parts = module.split(".")
        return ".".join(parts[:2])  # sparrow.data, sparrow.ops, sparrow.model, ...

    graph: dict[str, set[str]] = {}
    for module, targets in _without_package_inits(import_graph()).items():
        graph.setdefault(unit(module), set()).update(unit(t) for t in targets if unit(t) != unit(module))
    graph.pop("sparrow", None)  # sparrow/__init__ re-exports the public API from the layers below it
    for targets in graph.values():
        targets.discard("sparrow")
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between subpackages: " + " -> ".join(cycle)


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_top_level_kernels_name_is_left_to_hugging_face():
    """From a checkout's root (on sys.path under `python -m ...`), `import kernels` must not give our
    kernels/ (that is sparrow.kernels): transformers imports Hugging Face's `kernels` whenever it builds a model,
    and failed with an ImportError on ours."""
    import importlib.metadata
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed (the next test covers that case)")
    probe = ("import kernels, sparrow.kernels\n"
             "print(kernels.__file__)\n"
             "print(sparrow.kernels.__file__)\n")
    r = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    top, ours = (Path(line).resolve() for line in r.stdout.split())
    assert top != root / "kernels" / "__init__.py"
    assert ours == root / "kernels" / "__init__.py"


def test_top_level_kernels_name_without_hugging_face_kernels_reads_as_not_installed():
    """Without Hugging Face's package (the GPU machines' image), transformers' probe finds our kernels/ by name,
    imports it (no distribution metadata) and reads its __version__: that must say "not installed" rather than
    raise, or no model class can be imported (transformers 5.17 on an H200, 2026-12-04). The probe below hides
    the installed package, as that machine lacks it."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    probe = """
import importlib.machinery, importlib.metadata, os, sys
root = os.getcwd()
find_spec = importlib.machinery.PathFinder.find_spec.__func__
def hide(cls, name, path=None, target=None):
    # Only our kernels/ is found by that name: Hugging Face's package is absent.
    if name == "kernels" and path is not None and all(os.path.abspath(p or os.curdir) != root for p in path):
        return None
    return find_spec(cls, name, path, target)
importlib.machinery.PathFinder.find_spec = classmethod(hide)
version = importlib.metadata.version
def no_metadata(name):
    if name == "kernels":
        raise importlib.metadata.PackageNotFoundError(name)
    return version(name)
importlib.metadata.version = no_metadata
sys.path.insert(0, root)
from transformers.utils.import_utils import is_kernels_available
assert not is_kernels_available()
import kernels, sparrow.kernels
assert getattr(kernels, "__version__", "N/A") == "N/A"
try:
    from kernels import get_kernel
except ImportError as exc:
    assert "cannot import name 'get_kernel'" in str(exc), exc
else:
    raise AssertionError("a name came from the placeholder")
try:
    kernels.get_kernel
except AttributeError as exc:
    assert "not installed" in str(exc) and "sparrow.kernels" in str(exc), exc
from transformers import LlamaConfig, LlamaForCausalLM
LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=2, vocab_size=64))
print("ok")
"""
    pytest.importorskip("transformers")
    r = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
