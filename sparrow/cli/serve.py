"""Commands ``sparrow serve`` (the OpenAI-compatible server and chat page) and ``sparrow rag index|eval|records``
(retrieval over your own documents). They parse arguments and call :mod:`sparrow.serving` and :mod:`sparrow.rag`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server with batched streaming generation and a web chat page",
        description="Serve MODEL at http://HOST:PORT: /v1/chat/completions, /v1/completions, /v1/models and a chat "
                    "page at /. Requests are batched on one KV cache as they arrive.")
    parser.add_argument("model", help="a model folder (or a checkpoint's model folder inside its run)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", default=None, help="the model id clients send (default: the run's folder name)")
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together (rows of the KV cache)")
    parser.add_argument("--max-queued", type=int, default=64, help="waiting requests beyond the batch; more get 429")
    parser.add_argument("--max-tokens-in-flight", type=int, default=None,
                        help="bound on prompt + max_tokens summed over running requests (default: batch x context)")
    parser.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request sets none")
    parser.add_argument("--shutdown-timeout", type=float, default=10.0,
                        help="seconds running requests get to finish on shutdown before they are cancelled")
    parser.add_argument("--rag", default=None, metavar="INDEX", help="put passages retrieved from INDEX before each question")
    parser.add_argument("--rag-k", type=int, default=2, help="passages retrieved per question")
    parser.set_defaults(func=run_serve)

    rag = subparsers.add_parser("rag", help="retrieval over your own documents: index, evaluation, training data")
    commands = rag.add_subparsers(dest="rag_command", metavar="COMMAND")
    commands.required = True
    index = commands.add_parser("index", help="chunk text/markdown/jsonl documents and build a BM25 index")
    index.add_argument("docs", nargs="+", help=".txt, .md or .jsonl ('text' field) files")
    index.add_argument("-o", "--out", required=True, help="index folder to write")
    index.add_argument("--chunk-chars", type=int, default=400, help="longest chunk, cut between sentences")
    index.set_defaults(func=run_index)

    evaluate = commands.add_parser(
        "eval", help="retrieval hit rate and exact match with/without retrieval on the built-in world's facts",
        description="Index the built-in world's biographies (one per person and language), ask its fact questions "
                    "and report how often the asked person's biography is retrieved, and the chat model's exact "
                    "match without and with the retrieved passages before the question.")
    evaluate.add_argument("model")
    evaluate.add_argument("--k", type=int, default=2, help="passages per question")
    evaluate.add_argument("--split", default="heldout", choices=("heldout", "seen", "all"),
                          help="heldout: people whose facts are only described in the pretraining text")
    evaluate.add_argument("--limit", type=int, default=None, help="ask at most this many questions")
    evaluate.add_argument("--out", default=None, help="JSON output (default: print only)")
    evaluate.set_defaults(func=run_eval)

    records = commands.add_parser(
        "records", help="chat jsonl that teaches answering from retrieved passages (for `sparrow sft`)")
    records.add_argument("out", help="output .jsonl")
    records.add_argument("--count", type=int, default=6000)
    records.add_argument("--max-passages", type=int, default=2)
    records.add_argument("--questions", type=int, default=1,
                         help="questions about the passage's person, one per turn (1-5): more to learn per passage")
    records.set_defaults(func=run_records)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..rag import RagIndex
    from ..serving.adapter import load
    from ..serving.engine import Engine
    from ..serving.server import create_app

    rag = RagIndex.load(args.rag) if args.rag else None
    loaded = load(args.model, args.model_name)
    engine = Engine(loaded, max_batch=args.max_batch, max_queued=args.max_queued,
                    max_tokens_in_flight=args.max_tokens_in_flight)
    app = create_app(engine, rag=rag, rag_k=args.rag_k, default_max_tokens=args.default_max_tokens,
                     drain_timeout=args.shutdown_timeout)
    print(f"serving {loaded.name!r} (context {loaded.context_length}) at http://{args.host}:{args.port}/ "
          f"(chat page) and /v1 (OpenAI API)" + (f", retrieving from {args.rag}" if rag else ""))
    uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=args.shutdown_timeout)
    return 0


def run_index(args: argparse.Namespace) -> int:
    from ..rag import build_index

    index = build_index(args.docs, chunk_chars=args.chunk_chars)
    index.save(args.out)
    print(f"indexed {len(index.chunks)} chunks from {len(args.docs)} file(s) into {args.out}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..rag import Chunk, RagIndex, evaluate_rag, facts_queries, world_documents
    from ..serving.adapter import load

    docs = world_documents()
    index = RagIndex.build([Chunk(d["text"], "builtin-world", n + 1) for n, d in enumerate(docs)])
    queries = facts_queries(split=args.split)[:args.limit]
    result = evaluate_rag(load(args.model), index, queries, [d["person"] for d in docs], k=args.k)
    rows = [("questions", str(result["questions"])), (f"retrieval hit rate (top {args.k})", f"{result['retrieval_hit_rate']:.3f}"),
            ("exact match without retrieval", f"{result['exact_match_without_retrieval']:.3f}"),
            ("exact match with retrieval", f"{result['exact_match_with_retrieval']:.3f}"),
            ("right only with / only without", f"{result['right_only_with_retrieval']} / "
                                               f"{result['right_only_without_retrieval']}"),
            ("McNemar exact p (two-sided)", f"{result['mcnemar_p']:.2g}")]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "split": args.split, **result},
                                             ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        print(f"written: {args.out}")
    return 0


def run_records(args: argparse.Namespace) -> int:
    from ..data.builtin_corpus import write_jsonl
    from ..rag import training_records

    records = training_records(args.count, max_passages=args.max_passages, questions=args.questions)
    write_jsonl((json.dumps(r, ensure_ascii=False) for r in records), args.out, field=None)
    print(f"wrote {len(records)} conversations to {args.out}")
    return 0
