#!/usr/bin/env python3
"""End-to-end training-step throughput of SparrowForCausalLM: tokens/s, MFU and peak memory of a full step
(bf16 autocast forward on a GPU, backward, fused AdamW) for every ops backend, eager and under torch.compile, plus
packed documents (cu_seqlens) on the auto backend, and generation tokens/s with the KV cache. Then the same
shape as a transformers LlamaForCausalLM, unpatched (sdpa) and patched with ``sparrow.patch`` (tokens/s and
peak memory on a GPU; on a CPU the patched first loss is checked against the unpatched one, nothing is timed).

Variants: the reference model in eager PyTorch and under torch.compile; the triton and cuda backends, each
eager and compiled; the auto backend on packed rows (several documents per row). A variant whose backend
cannot run here (no GPU, extension not built) is skipped with the reason. Every variant starts from the same
weights and batch; its first loss must match the reference's before it is timed.

    python benchmarks/bench_train.py                  # presets 124m and 1b, seq 2048 (a GPU)
    python benchmarks/bench_train.py --quick          # preset tiny, 2 x 128 tokens: a CPU smoke run (< 1 min)
    python benchmarks/bench_train.py --presets 124m --variants reference,triton+compile --batch-size 8

Writes benchmarks/results/<device>/train.json: {"meta": {...}, "rows": [...], "plot": {...}} (the format
`python -m benchmarks` plots).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import sparrow  # noqa: E402
from benchmarks.common import device_info, print_table, write_results  # noqa: E402
from sparrow import SparrowConfig, SparrowForCausalLM, ops  # noqa: E402
from sparrow.testing import tolerance  # noqa: E402

# (name, backend, torch.compile, packed documents)
VARIANTS = (
    ("reference", "reference", False, False),
    ("reference+compile", "reference", True, False),
    ("triton", "triton", False, False),
    ("triton+compile", "triton", True, False),
    ("cuda", "cuda", False, False),
    ("cuda+compile", "cuda", True, False),
    ("auto packed", "auto", False, True),
    ("auto packed+compile", "auto", True, True),
)

# The micro-batch per preset: the largest that leaves the reference's eager attention (which materialises
# float32 (B, H, T, T) scores and probabilities for every layer) inside an 80 GB GPU at T = 2048, so every
# variant runs the same batch and their tokens/s compare directly.
DEFAULT_BATCH = {"tiny": 4, "26m": 8, "124m": 4, "1b": 1}

# Dense bf16 tensor-core peak, TFLOP/s, from the vendor datasheets; matched as substrings of the device name,
# most specific first (an "H100 PCIe" is not an SXM part).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="preset tiny, short sequences, few steps: runs on a CPU")
    p.add_argument("--presets", default=None, help="comma-separated (default 124m,1b; --quick tiny)")
    p.add_argument("--variants", default=None, help=f"comma-separated, run in this order, from: {', '.join(v[0] for v in VARIANTS)}")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 2048; --quick 128)")
    p.add_argument("--batch-size", type=int, default=None, help=f"rows per step (default per preset: {DEFAULT_BATCH}; --quick 2)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="bf16 autocast or plain float32 (default bf16 on a GPU, fp32 on a CPU, as sparrow.train's 'auto')")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default inductor; --quick on a CPU: aot_eager)")
    p.add_argument("--docs-per-row", type=int, default=4, help="documents per row in the packed variants")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first, the first one checked (default 3; --quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps, median reported (default 10; --quick 2)")
    p.add_argument("--prompt-len", type=int, default=None, help="generation prompt tokens (default 128; --quick 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 256; --quick 8)")
    p.add_argument("--no-generate", action="store_true", help="skip the generation measurements")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers model, patched vs unpatched")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>/train.json)")
    return p.parse_args()


# ------------------------------------------------------------------------------------------------ helpers
def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def matmul_params(config: SparrowConfig) -> int:
    """Parameters that take part in a matmul: the input embedding is a lookup, so an untied one is left out;
    a tied one is counted once, as the LM head. (The norm weights stay in: under 0.1% of the total.)"""
    untied_embedding = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return config.num_parameters() - untied_embedding


def train_flops(config: SparrowConfig, doc_lengths: list[int]) -> float:
    """Model FLOPs of one training step (forward + backward), the PaLM (appendix B) / nanoGPT convention:

        6 * N * tokens  +  12 * L * H * Q * sum(T_doc ** 2)

    N: matmul parameters (`matmul_params`); 6 = 2 (multiply-add) * 3 (forward, then backward for inputs and
    for weights). The attention term is QK^T and AV, 2 * 2 * T * H * Q per token and layer forward, times 3;
    with one document per row it is the convention's 12*L*H*Q*T per token. Like the convention it ignores
    the causal mask (a kernel that skips masked blocks does half of it) and recomputation, so MFU compares
    implementations on the work the model needs, not on the work each one chooses to do.
    """
    tokens = sum(doc_lengths)
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * sum(n * n for n in doc_lengths)
    return 6.0 * matmul_params(config) * tokens + attention


def synthetic_batch(config: SparrowConfig, batch: int, seq: int, docs_per_row: int, device: torch.device):
    """Random ids (fixed seed), and for the packed variants each row cut into `docs_per_row` documents of
    random lengths, labels -100 at each document's first token (its predecessor belongs to another document),
    as sparrow.data packs real rows."""
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    docs = max(1, min(docs_per_row, seq))
    lengths: list[int] = []
    for _ in range(batch):
        cuts = (torch.randperm(seq - 1, generator=g)[: docs - 1] + 1).sort().values.tolist()
        bounds = [0, *cuts, seq]
        lengths += [b - a for a, b in zip(bounds, bounds[1:])]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    packed_labels = ids.clone().view(-1)
    packed_labels[cu[:-1].long()] = -100
    return {
        "plain": dict(input_ids=ids.to(device), labels=ids.to(device), cu_seqlens=None, max_seqlen=None,
                      doc_lengths=[seq] * batch),
        "packed": dict(input_ids=ids.to(device), labels=packed_labels.view(batch, seq).to(device),
                       cu_seqlens=cu.to(device), max_seqlen=max(lengths), doc_lengths=lengths),
    }


def unavailable(backend: str, device: torch.device) -> str | None:
    if backend in ("reference", "auto"):
        return None
    if device.type != "cuda":
        # On a CPU the Triton kernels only run through its interpreter and the cuda backend through its test
        # twins: correct, but their speed means nothing.
        return f"the {backend} backend is timed on a CUDA GPU only (this run is on the {device.type})"
    error = ops.backend_error(backend)
    return f"the {backend} backend is unavailable: {error}" if error else None


def skipped(row: dict, rows: list[dict], label: str, backend: str, device: torch.device) -> bool:
    """Record ``row`` as skipped, with the reason, when ``backend`` cannot be timed here."""
    reason = unavailable(backend, device)
    if reason:
        row.update(status="skipped", reason=reason)
        rows.append(row)
        print(f"{label} skipped: {reason}", flush=True)
    return reason is not None


def build_model(config: SparrowConfig, backend: str, device: torch.device, dtype=None) -> SparrowForCausalLM:
    # The same seed on the same device gives every variant the same weights.
    torch.manual_seed(0)
    with torch.device(device):
        model = SparrowForCausalLM(config, backend=backend)
    return model.to(dtype) if dtype is not None else model


def free_memory(device: torch.device) -> None:
    torch.compiler.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, n: int, device: torch.device) -> list[float]:
    """Seconds per call of `step`, bracketed by CUDA events on a GPU (the ops run synchronously on a CPU).

    Not benchmarks.common.time_fn: its time budgets and L2 flushes suit microsecond kernels, while a training
    step takes up to a second and changes the weights, so a fixed count of consecutive steps is what to time."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
FALLBACKS: dict[str, list[str]] = {}


def call_recording_fallbacks(backend: str, fn):
    """Run fn; keep the ops layer's "falling back to the reference" warnings for `backend` (it warns once per
    process, so the first variant to hit one records it for all), re-emitting every other warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    for w in caught:
        text = str(w.message)
        if "falling back to the reference" in text:
            FALLBACKS.setdefault(backend, []).append(text)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return result


# --------------------------------------------------------------------------------------------- training
def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def reference_loss(config: SparrowConfig, data: dict, device: torch.device, precision: str) -> float:
    model = build_model(config, "reference", device)
    with torch.no_grad(), autocast(device, precision):
        loss = model(data["input_ids"], labels=data["labels"], cu_seqlens=data["cu_seqlens"],
                     max_seqlen=data["max_seqlen"]).loss.item()
    del model
    free_memory(device)
    return loss


def run_train_variant(config, backend, compiled, data, device, precision, compile_backend, warmup, steps) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(config, backend, device)
    model.train()
    forward = torch.compile(model, backend=compile_backend) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    ids, labels, cu, max_seqlen = data["input_ids"], data["labels"], data["cu_seqlens"], data["max_seqlen"]

    def step():
        with autocast(device, precision):
            loss = forward(ids, labels=labels, cu_seqlens=cu, max_seqlen=max_seqlen).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    # The first step's loss is taken before any update, so it must equal the reference's on these weights.
    start = time.perf_counter()
    first_loss = call_recording_fallbacks(backend, step).item()
    for _ in range(max(0, warmup - 1)):
        step()
    sync(device)
    warmup_s = time.perf_counter() - start
    times = time_steps(step, steps, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"first_loss": first_loss, "times": times, "peak_mem_mib": peak, "warmup_s": warmup_s}


def train_rows(preset: str, config: SparrowConfig, args, device: torch.device, variants, peak: float | None,
               on_row=None) -> tuple[list, bool]:
    """One row per variant; ``on_row(rows)`` after each, so a run stopped at a time limit keeps what it timed."""
    batch = args.batch_size or (2 if args.quick else DEFAULT_BATCH.get(preset, 4))
    seq = args.seq_len or (128 if args.quick else 2048)
    seq = min(seq, config.max_position_embeddings)
    batches = synthetic_batch(config, batch, seq, args.docs_per_row, device)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    steps = args.steps or (2 if args.quick else 10)
    atol, rtol = (tolerance(DTYPES[args.precision])[k] for k in ("atol", "rtol"))
    ref_losses: dict[str, float] = {}
    rows, errors = [], False
    for name, backend, compiled, packed in variants:
        layout = "packed" if packed else "plain"
        data = batches[layout]
        tokens = batch * seq
        row = {"kind": "train", "preset": preset, "variant": name, "backend": backend, "compile": compiled,
               "packed": packed, "compile_backend": args.compile_backend if compiled else None,
               "precision": args.precision, "batch_size": batch, "seq_len": seq,
               "docs": len(data["doc_lengths"]), "tokens_per_step": tokens}
        if skipped(row, rows, f"{preset:5s} {name:20s}", backend, device):
            continue
        try:
            if layout not in ref_losses:
                ref_losses[layout] = reference_loss(config, data, device, args.precision)
            result = run_train_variant(config, backend, compiled, data, device, args.precision, args.compile_backend,
                                       warmup, steps)
        except torch.OutOfMemoryError as exc:
            row.update(status="oom", reason=str(exc).splitlines()[0])
        except Exception as exc:  # one broken variant must not hide the others' numbers
            row.update(status="error", reason=f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
            errors = True
        else:
            row["reference_loss"] = round(ref_losses[layout], 5)
            row["first_loss"] = round(result["first_loss"], 5)
            if backend in FALLBACKS:
                row["fallbacks"] = FALLBACKS[backend]
            if not math.isclose(result["first_loss"], ref_losses[layout], rel_tol=rtol, abs_tol=atol):
                row.update(status="loss mismatch", reason=f"first loss {result['first_loss']:.5f} vs reference "
                                                          f"{ref_losses[layout]:.5f}: not timed")
                errors = True
            else:
                step_s = statistics.median(result["times"])
                flops = train_flops(config, data["doc_lengths"])
                row.update(status="ok", warmup_s=round(result["warmup_s"], 2), step_ms=round(step_s * 1e3, 3),
                           step_ms_min=round(min(result["times"]) * 1e3, 3),
                           tokens_per_s=round(tokens / step_s, 1), tflops=round(flops / step_s / 1e12, 3),
                           mfu=round(flops / step_s / (peak * 1e12), 4) if peak else None,
                           peak_mem_mib=round(result["peak_mem_mib"], 1) if result["peak_mem_mib"] is not None else None)
        free_memory(device)
        rows.append(row)
        if on_row is not None:
            on_row(rows)
        if row["status"] == "ok":
            mfu = f"{row['mfu'] * 100:5.1f}%" if row["mfu"] is not None else "    -"
            mem = f"{row['peak_mem_mib']:9.0f} MiB" if row["peak_mem_mib"] is not None else ""
            print(f"{preset:5s} {name:20s} {row['step_ms']:9.2f} ms/step {row['tokens_per_s']:11.0f} tok/s "
                  f"MFU {mfu} {mem} (warmup {row['warmup_s']:.1f} s)", flush=True)
        else:
            print(f"{preset:5s} {name:20s} {row['status']}: {row['reason']}", flush=True)
    return rows, errors


# ------------------------------------------------------------------------------------------- generation
def kv_cache_stream(model, prompt: list[int], new_tokens: int):
    from sparrow.generate import GenerationConfig, stream

    return stream(model, prompt, GenerationConfig(max_new_tokens=new_tokens, temperature=0.0))


@torch.inference_mode()
def recompute_stream(model, prompt: list[int], new_tokens: int):
    """Greedy decoding that runs the whole sequence again for every token: the baseline the cache removes."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    for _ in range(new_tokens):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        yield int(nxt)
        ids = torch.cat([ids, nxt], dim=1)


def time_generation(stream_fn, model, prompt, new_tokens) -> tuple[float, float, list[int]]:
    """(prefill + first token seconds, decode tokens/s after the first token, tokens). Each yielded token
    has been copied to the host, so the clock reads finished GPU work."""
    start = time.perf_counter()
    tokens, first = [], None
    for token in stream_fn(model, prompt, new_tokens):
        tokens.append(token)
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    decode = (len(tokens) - 1) / (end - first) if len(tokens) > 1 and end > first else float("nan")
    return first - start, decode, tokens


def generation_rows(preset: str, config: SparrowConfig, args, device: torch.device) -> tuple[list, bool]:
    prompt_len = args.prompt_len or (16 if args.quick else 128)
    new_tokens = args.new_tokens or (8 if args.quick else 256)
    new_tokens = min(new_tokens, config.max_position_embeddings - prompt_len)
    repeat = 1 if args.quick else 3
    dtype = DTYPES[args.precision]
    g = torch.Generator().manual_seed(99)
    prompt = torch.randint(0, config.vocab_size, (prompt_len,), generator=g).tolist()
    try:
        importlib.import_module("sparrow.generate")

        methods = [("kv-cache", kv_cache_stream, b) for b in ("reference", "triton", "cuda")]
    except ImportError as exc:
        print(f"sparrow.generate not importable ({exc}): timing full-recompute decoding only", flush=True)
        methods = []
    methods.append(("recompute", recompute_stream, "auto"))
    rows, errors, reference_tokens = [], False, None
    for method, stream_fn, backend in methods:
        name = f"generate {method} {backend}"
        row = {"kind": "generate", "preset": preset, "variant": name, "backend": backend, "method": method,
               "batch_size": 1, "prompt_len": prompt_len, "new_tokens": new_tokens, "dtype": str(dtype).removeprefix("torch.")}
        if skipped(row, rows, f"{preset:5s} {name:28s}", backend, device):
            continue
        try:
            model = build_model(config, backend, device, dtype).eval()
            call_recording_fallbacks(backend, lambda: time_generation(stream_fn, model, prompt, min(4, new_tokens)))
            runs = [time_generation(stream_fn, model, prompt, new_tokens) for _ in range(repeat)]
            model = None  # freed before the next method's model is built
        except torch.OutOfMemoryError as exc:
            row.update(status="oom", reason=str(exc).splitlines()[0])
        except Exception as exc:
            row.update(status="error", reason=f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
            errors = True
        else:
            tokens = runs[0][2]
            if reference_tokens is None:
                reference_tokens = tokens
            # A randomly initialised model's logits are nearly flat, so bf16 rounding may flip a greedy
            # choice between kernels; the agreement is reported, not required.
            agree = sum(a == b for a, b in zip(tokens, reference_tokens)) / max(1, len(reference_tokens))
            row.update(status="ok", prefill_ms=round(statistics.median(r[0] for r in runs) * 1e3, 3),
                       decode_tokens_per_s=round(statistics.median(r[1] for r in runs), 1),
                       tokens_agree_with_first=round(agree, 3))
            if backend in FALLBACKS:
                row["fallbacks"] = FALLBACKS[backend]
        free_memory(device)
        rows.append(row)
        if row["status"] == "ok":
            print(f"{preset:5s} {name:28s} {row['decode_tokens_per_s']:9.1f} tok/s decode, prefill "
                  f"{row['prefill_ms']:.1f} ms ({prompt_len} tokens)", flush=True)
        else:
            print(f"{preset:5s} {name:28s} {row['status']}: {row['reason']}", flush=True)
    return rows, errors


# ------------------------------------------------------------------------------------------ transformers
# (name, sparrow.patch backend or None for the unpatched sdpa model, torch.compile)
TRANSFORMERS_VARIANTS = (
    ("hf sdpa", None, False),
    ("hf sdpa+compile", None, True),
    ("hf patched auto", "auto", False),
    ("hf patched auto+compile", "auto", True),
)


def transformers_rows(preset: str, config: SparrowConfig, args, device: torch.device) -> tuple[list, bool]:
    """The preset's shape as a transformers LlamaForCausalLM, one training step timed per variant, every
    variant's first loss checked against the unpatched eager model's. On a CPU: that check only."""
    try:
        import transformers
    except ImportError as exc:
        print(f"transformers not importable ({exc}): no patched-vs-unpatched rows", flush=True)
        return [], False
    batch = args.batch_size or (2 if args.quick else DEFAULT_BATCH.get(preset, 4))
    seq = min(args.seq_len or (128 if args.quick else 2048), config.max_position_embeddings)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1234)).to(device)
    hf_config = transformers.LlamaConfig(**config.to_hf_dict())
    atol, rtol = (tolerance(DTYPES[args.precision])[k] for k in ("atol", "rtol"))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    steps = args.steps or (2 if args.quick else 10)
    rows, errors, reference = [], False, None
    for name, backend, compiled in TRANSFORMERS_VARIANTS:
        row = {"kind": "train", "preset": preset, "variant": name, "backend": backend, "compile": compiled,
               "precision": args.precision, "batch_size": batch, "seq_len": seq, "tokens_per_step": batch * seq}
        if compiled and device.type != "cuda":
            row.update(status="skipped", reason="compiled transformers variants are timed on a CUDA GPU only")
            rows.append(row)
            continue
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            torch.manual_seed(0)
            model = transformers.LlamaForCausalLM(hf_config).to(device).train()
            if backend is not None:
                sparrow.patch(model, backend)
            forward = torch.compile(model, backend=args.compile_backend) if compiled else model
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")

            def step():
                with autocast(device, args.precision):
                    loss = forward(ids, labels=ids, use_cache=False).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                return loss

            start = time.perf_counter()
            first_loss = call_recording_fallbacks(backend or "reference", step).item()
            reference = first_loss if reference is None else reference
            row.update(first_loss=round(first_loss, 5), reference_loss=round(reference, 5))
            if not math.isclose(first_loss, reference, rel_tol=rtol, abs_tol=atol):
                row.update(status="loss mismatch", reason=f"first loss {first_loss:.5f} vs unpatched {reference:.5f}")
                errors = True
            elif device.type != "cuda":
                row.update(status="checked", reason="CPU: first loss checked against the unpatched model, not timed")
            else:
                for _ in range(max(0, warmup - 1)):
                    step()
                sync(device)
                warmup_s = time.perf_counter() - start
                times = time_steps(step, steps, device)
                step_s = statistics.median(times)
                row.update(status="ok", warmup_s=round(warmup_s, 2), step_ms=round(step_s * 1e3, 3),
                           tokens_per_s=round(batch * seq / step_s, 1),
                           peak_mem_mib=round(torch.cuda.max_memory_allocated(device) / 2**20, 1))
            model = forward = optimizer = None
        except torch.OutOfMemoryError as exc:
            row.update(status="oom", reason=str(exc).splitlines()[0])
        except Exception as exc:
            row.update(status="error", reason=f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
            errors = True
        free_memory(device)
        rows.append(row)
        detail = (f"{row['tokens_per_s']:11.0f} tok/s {row['peak_mem_mib']:9.0f} MiB" if "tokens_per_s" in row
                  else f"{row['status']}: {row.get('reason', '')} (first loss {row.get('first_loss')})")
        print(f"{preset:5s} {name:24s} {detail}", flush=True)
    return rows, errors


# ----------------------------------------------------------------------------------------------- report
def print_tables(rows: list[dict]) -> None:
    print()
    print_table([r for r in rows if r["kind"] == "train"],
                ["preset", "variant", "step_ms", "tokens_per_s", "tflops", "mfu", "peak_mem_mib", "warmup_s", "status"])
    generation = [r for r in rows if r["kind"] == "generate"]
    if generation:
        print()
        print_table(generation, ["preset", "variant", "prefill_ms", "decode_tokens_per_s", "tokens_agree_with_first",
                                 "status"])


def main() -> int:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # As sparrow.train's precision "auto": nobody trains in bf16 on a CPU, where it is emulated and slow.
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    # Inductor's C++ code generation takes minutes on a 2-core CPU; a CPU smoke run still traces the model
    # through dynamo and AOTAutograd (graph breaks, fake tensors of the custom ops), only without codegen.
    args.compile_backend = args.compile_backend or ("aot_eager" if args.quick and device.type == "cpu" else "inductor")
    presets = [p for p in (args.presets or ("tiny" if args.quick else "124m,1b")).split(",") if p]
    wanted = [v for v in args.variants.split(",") if v] if args.variants else None
    by_name = {v[0]: v for v in VARIANTS}
    unknown = sorted(set(wanted or ()) - set(by_name))
    if unknown:
        print(f"--variants: unknown {unknown}; choose from {list(by_name)}", file=sys.stderr)
        return 2
    # In the order asked: a run cut by a time limit keeps the variants named first.
    variants = [by_name[name] for name in dict.fromkeys(wanted)] if wanted else list(VARIANTS)
    # MFU is against the bf16 tensor-core peak, which a float32 run does not aim at.
    peak = peak_tflops(device) if args.precision == "bf16" else None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    if device.type == "cuda" and peak is None:
        print(f"no bf16 peak known for {gpu!r}: MFU left empty", flush=True)
    meta = {
        "benchmark": "train",
        **device_info(),
        "sparrow": sparrow.__version__,
        "cpu_count": os.cpu_count(),
        "quick": args.quick,
        "precision": args.precision,
        "compile_backend": args.compile_backend,
        "peak_bf16_tflops": peak,
        "method": "one training step = forward with loss (bf16 autocast, or float32 per `precision`), "
                  "backward, fused AdamW step, zero_grad; float32 weights; same seeded weights and random-id "
                  "batch for every variant; first step's loss checked against the eager reference; warmup "
                  "steps (compilation included) excluded; median of the timed steps, CUDA events on a GPU; "
                  "MFU = (6*N*tokens + 12*L*H*Q*sum(T_doc^2)) / step time / peak_bf16_tflops, N the matmul "
                  "parameters (PaLM/nanoGPT convention); peak_mem_mib = torch.cuda.max_memory_allocated over "
                  "the variant. Generation: batch 1, greedy, weights in `precision`, decode tokens/s after the "
                  "first token (prefill reported apart), median of repeats.",
    }

    def save(rows: list[dict]):
        # Written after each group of rows as well: a run stopped at a time limit keeps what it measured.
        plot_y = ["tokens_per_s"]
        if any(r.get("mfu") is not None for r in rows):
            plot_y.append("mfu")
        if any(r.get("decode_tokens_per_s") is not None for r in rows):
            plot_y.append("decode_tokens_per_s")
        return write_results("train", rows, meta, plot={"x": "preset", "y": plot_y, "series": "variant"}, out=args.out)

    rows, errors = [], False
    for preset in presets:
        config = SparrowConfig.from_preset(preset)
        if device.type == "cuda":
            # Weights, gradients and the two AdamW moments, all float32: 16 bytes a parameter before activations.
            states = 16 * config.num_parameters()
            total = torch.cuda.get_device_properties(device).total_memory
            if states > 0.8 * total:
                reason = f"{states / 2**30:.1f} GiB of parameters and optimizer state exceed 80% of the GPU's {total / 2**30:.0f} GiB"
                rows.append({"kind": "train", "preset": preset, "variant": "all", "status": "skipped", "reason": reason})
                print(f"{preset}: skipped: {reason}", flush=True)
                continue
        new_rows, failed = train_rows(preset, config, args, device, variants, peak,
                                      on_row=lambda done, before=list(rows): save(before + done))
        rows += new_rows
        errors |= failed
        save(rows)
        if not args.no_transformers:
            new_rows, failed = transformers_rows(preset, config, args, device)
            rows += new_rows
            errors |= failed
            save(rows)
        if not args.no_generate:
            new_rows, failed = generation_rows(preset, config, args, device)
            rows += new_rows
            errors |= failed
            save(rows)

    print_tables(rows)
    path = save(rows)
    print(f"\nwrote {path}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
