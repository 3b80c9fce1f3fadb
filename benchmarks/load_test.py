"""Load test of `sparrow serve`: N concurrent streaming clients on loopback for T seconds.

    python -m benchmarks.load_test --model runs/sft-tiny/model --clients 16 --duration 10   # starts its own server
    python -m benchmarks.load_test --url http://127.0.0.1:8000 --clients 16 --duration 10   # a running server

Each client sends streamed chat requests back to back until the time is up and it has finished at least
``--min-requests`` (a request in flight then gets ``--grace`` more seconds; the whole run is cut at duration +
grace, a request still running then counting as an error, so the run is bounded). ``--min-requests`` makes a
run's size independent of the machine's speed: a loaded machine takes longer instead of sending fewer requests. Reported: requests, errors (non-200
status, error events, broken streams, timeouts), generated tokens per second over the run (from the usage that
each stream ends with), time to first token (first content event) and per-token latency (time after the first
token divided by the content events after it, one per token but for stop tokens and split characters), p50
and p99 in ms. Prints a table; writes JSON (``--out``, default
``benchmarks/results/<device>/load_test.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

QUESTIONS = ["What is 12 plus 7?", "王明住在哪里？", "Where does Bala Kou live?", "Say hello", "3 加 4 等于多少？",
             "What does a baker do?", "Tell me about cats.", "你好"]


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def _one_request(client, url: str, model: str, max_tokens: int, rng: random.Random, timeout: float) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0.8, "seed": rng.randrange(2**31),
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    tokens, pieces, done = 0, 0, False
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=timeout) as response:
            if response.status_code != 200:
                await response.aread()
                return {"error": f"HTTP {response.status_code}: {response.text[:200]}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    return {"error": f"error event: {event['error'].get('message')}"}
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        last = time.perf_counter()
                        first = first or last
                        pieces += 1
    except Exception as exc:  # a broken connection or a timeout is an error of the run, not of the script
        return {"error": f"{type(exc).__name__}: {exc}"}
    if not done:
        return {"error": "the stream ended without [DONE]"}
    result = {"tokens": tokens, "seconds": time.perf_counter() - start}
    if first is not None:
        result["ttft"] = first - start
        if pieces > 1:  # one content event per token, except a character split across tokens or a stop token
            result["per_token"] = (last - first) / (pieces - 1)
    return result


async def _client(index: int, url: str, model: str, max_tokens: int, stop_at: float, min_requests: int,
                  timeout: float, results: list):
    import httpx

    rng = random.Random(index)
    sent = 0
    async with httpx.AsyncClient() as client:
        while time.perf_counter() < stop_at or sent < min_requests:
            results.append(await _one_request(client, url, model, max_tokens, rng, timeout))
            sent += 1


async def _run(url: str, clients: int, duration: float, max_tokens: int, grace: float, min_requests: int) -> dict:
    import httpx

    async with httpx.AsyncClient() as client:
        model = (await client.get(f"{url}/v1/models", timeout=10)).json()["data"][0]["id"]
    results: list[dict] = []
    start = time.perf_counter()
    tasks = [asyncio.create_task(_client(i, url, model, max_tokens, start + duration, min_requests, duration + grace,
                                         results)) for i in range(clients)]
    _, pending = await asyncio.wait(tasks, timeout=duration + grace)
    for task in pending:  # a request still running at duration + grace counts as an error
        task.cancel()
        results.append({"error": "still running after the grace period"})
    await asyncio.gather(*pending, return_exceptions=True)
    elapsed = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ms = lambda values, q: None if not values else round(1000 * _percentile(values, q), 2)
    ttft = [r["ttft"] for r in ok if "ttft" in r]
    per_token = [r["per_token"] for r in ok if "per_token" in r]
    tokens = sum(r["tokens"] for r in ok)
    return {"url": url, "model": model, "clients": clients, "duration_s": duration, "elapsed_s": round(elapsed, 3),
            "max_tokens": max_tokens, "min_requests_per_client": min_requests, "requests": len(results), "completed": len(ok), "errors": len(errors),
            "error_samples": sorted(set(errors))[:5], "tokens": tokens, "tokens_per_s": round(tokens / elapsed, 2),
            "requests_per_s": round(len(ok) / elapsed, 3),
            "mean_completion_tokens": round(tokens / max(len(ok), 1), 2),
            "ttft_ms": {"p50": ms(ttft, 50), "p99": ms(ttft, 99)},
            "per_token_ms": {"p50": ms(per_token, 50), "p99": ms(per_token, 99)}}


def run(url: str, *, clients: int = 16, duration: float = 10.0, max_tokens: int = 32, grace: float = 30.0,
        min_requests: int = 0, out: str | Path | None = None) -> dict:
    if clients < 1 or duration <= 0:
        raise ValueError("clients, duration: must be positive")
    if min_requests < 0 or grace <= 0:
        raise ValueError(f"min_requests, grace: must be >= 0 and > 0, got {min_requests}, {grace}")
    if not url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
        raise ValueError(f"url: the load test only talks to loopback servers, got {url}")
    result = asyncio.run(_run(url.rstrip("/"), clients, duration, max_tokens, grace, min_requests))
    _report(result, out)
    return result


def run_against_model(model_dir: str, *, max_batch: int = 8, **kwargs) -> dict:
    """Start `sparrow serve` on ``model_dir`` in this process (127.0.0.1, a free port), run, stop it."""
    from sparrow.serving.adapter import load
    from sparrow.serving.engine import Engine
    from sparrow.serving.server import BackgroundServer, create_app

    engine = Engine(load(model_dir), max_batch=max_batch, max_queued=max(64, 4 * kwargs.get("clients", 16)))
    with BackgroundServer(create_app(engine)) as server:
        return run(server.url, **kwargs)


def _report(result: dict, out) -> None:
    rows = [("clients", result["clients"]), ("requests (completed)", f"{result['requests']} ({result['completed']})"),
            ("errors", result["errors"]), ("tokens/s", result["tokens_per_s"]),
            ("TTFT p50 / p99 ms", f"{result['ttft_ms']['p50']} / {result['ttft_ms']['p99']}"),
            ("per-token p50 / p99 ms", f"{result['per_token_ms']['p50']} / {result['per_token_ms']['p99']}")]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if result["error_samples"]:
        print("errors:", *result["error_samples"], sep="\n  ")
    if out is None:
        from benchmarks.common import RESULTS, device_slug

        out = RESULTS / device_slug() / "load_test.json"
    try:
        from benchmarks.common import device_info

        meta = device_info()
    except Exception:  # the figures matter more than the machine description
        meta = {}
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, **result}, indent=2, ensure_ascii=False) + "\n")
    print(f"written: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="a model folder: serve it in this process on 127.0.0.1")
    where.add_argument("--url", help="a running server on loopback, e.g. http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds during which clients start requests")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds after --duration before the run is cut (requests still running are errors)")
    parser.add_argument("--min-requests", type=int, default=0,
                        help="requests each client finishes even past --duration (within --grace)")
    parser.add_argument("--max-batch", type=int, default=8, help="with --model: rows of the batch")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    common = dict(clients=args.clients, duration=args.duration, max_tokens=args.max_tokens, grace=args.grace,
                  min_requests=args.min_requests, out=args.out)
    result = (run_against_model(args.model, max_batch=args.max_batch, **common) if args.model
              else run(args.url, **common))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
