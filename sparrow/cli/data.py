"""``sparrow data clean|tokenize|builtin|eval-items|chats``: corpus cleaning, token files and the built-in
corpus (:mod:`sparrow.data`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="corpus cleaning, the built-in corpus, token files")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data_sub.required = True

    clean = data_sub.add_parser("clean", help="normalise, filter and deduplicate documents into a JSON-lines file",
                                description="Reads text/jsonl/parquet files, globs, directories or hub datasets; "
                                            "writes {\"text\": ...} lines and reports what each step removed.")
    clean.add_argument("inputs", nargs="+", metavar="IN", help="files, globs, directories, hub names or 'builtin'")
    clean.add_argument("output", metavar="OUT", help="output .jsonl")
    clean.add_argument("--field", default="text", help="text column of jsonl/parquet/hub inputs (default: text)")
    clean.add_argument("--hub-config", default=None, help="hub dataset config, e.g. 20231101.zh")
    clean.add_argument("--split", default="train", help="hub dataset split (default: train)")
    clean.add_argument("--text-unit", default="document", choices=("document", "paragraph", "line"),
                       help="how plain-text files are cut into documents")
    clean.add_argument("--limit", type=int, default=None, help="read at most this many documents")
    clean.add_argument("--t2s", action="store_true", help="convert traditional to simplified Chinese (OpenCC)")
    clean.add_argument("--min-chars", type=int, default=10)
    clean.add_argument("--max-chars", type=int, default=None)
    clean.add_argument("--languages", default="zh,en",
                       help="keep documents mostly in these scripts, comma-separated (zh, en), or 'any'")
    clean.add_argument("--min-language-fraction", type=float, default=0.5)
    clean.add_argument("--no-exact-dedup", action="store_true")
    clean.add_argument("--no-near-dedup", action="store_true")
    clean.add_argument("--near-threshold", type=float, default=0.8, help="MinHash Jaccard threshold")
    clean.set_defaults(func=run_clean)

    builtin = data_sub.add_parser("builtin", help="write the built-in corpus (Python docs + generated bilingual text)")
    builtin.add_argument("output", metavar="OUT", help="output .jsonl")
    builtin.add_argument("--seed", type=int, default=0)
    builtin.add_argument("--no-python-docs", action="store_true", help="only the generated part")
    builtin.set_defaults(func=run_builtin)

    items = data_sub.add_parser("eval-items", help="write the built-in corpus's exact-match evaluation questions")
    items.add_argument("output", metavar="OUT", help="output .jsonl")
    items.add_argument("--seed", type=int, default=0)
    items.add_argument("--split", default="heldout", choices=("heldout", "seen", "all"))
    items.set_defaults(func=run_eval_items)

    chats = data_sub.add_parser("chats", help="write the built-in fine-tuning conversations (messages jsonl for `sparrow sft`)",
                                description="Questions the corpus asks about its seen people, arithmetic on operand "
                                            "pairs it may state, and reading passages; none is held out.")
    chats.add_argument("output", metavar="OUT", help="output .jsonl")
    chats.add_argument("--seed", type=int, default=0)
    chats.set_defaults(func=run_chats)

    tokenize = data_sub.add_parser(
        "tokenize", help="tokenize a corpus into a memory-mapped token file (<out>.bin + <out>.json)",
        description="Reads text/jsonl/parquet files, globs, directories or hub datasets and writes the token ids "
                    "of every document followed by <|endoftext|>, using the C++ encoder on all cores.")
    tokenize.add_argument("inputs", nargs="+", metavar="IN", help="files, globs, directories, hub names or 'builtin'")
    tokenize.add_argument("--tokenizer", "-t", required=True, help="tokenizer.json (or its directory) or a .tiktoken file")
    tokenize.add_argument("--output", "-o", required=True, help="output prefix: writes OUT.bin and OUT.json")
    tokenize.add_argument("--field", default="text", help="text column of jsonl/parquet inputs (default: text)")
    tokenize.add_argument("--text-unit", default="document", choices=("document", "paragraph", "line"),
                          help="how plain-text files are cut into documents (default: one per file)")
    tokenize.add_argument("--split-lines", action="store_true", help="shorthand for --text-unit line")
    tokenize.add_argument("--threads", type=int, default=None, help="encoder threads (default: all cores)")
    tokenize.add_argument("--limit", type=int, default=None, help="stop after this many documents")
    tokenize.add_argument("--no-progress", action="store_true")
    tokenize.set_defaults(func=run_tokenize)


def run_tokenize(args: argparse.Namespace) -> int:
    from ..data.token_file import token_file_paths
    from ..tokenizer.corpus import tokenize_corpus

    meta = tokenize_corpus(args.inputs, args.output, args.tokenizer, field=args.field,
                           text_unit="line" if args.split_lines else args.text_unit, num_threads=args.threads,
                           limit=args.limit, show_progress=not args.no_progress)
    bin_path, meta_path = token_file_paths(args.output)
    print(f"wrote {bin_path} ({meta['num_tokens']} tokens, {meta['num_documents']} documents, {meta['dtype']}) "
          f"and {meta_path}")
    return 0


def run_clean(args: argparse.Namespace) -> int:
    from ..data.builtin_corpus import write_jsonl
    from ..data.cleaning import NEAR_DEDUP_INSTALL, Cleaner, default_steps, near_dedup_available
    from ..data.loading import iter_texts, resolve_sources

    languages = None if args.languages.strip().lower() in ("", "any", "none") else [
        s.strip() for s in args.languages.split(",") if s.strip()]
    near_dedup = not args.no_near_dedup
    if near_dedup and not near_dedup_available():
        print(f"sparrow data clean: near-duplicate removal skipped: datasketch is not installed ({NEAR_DEDUP_INSTALL}; "
              "--no-near-dedup silences this)", file=sys.stderr)
        near_dedup = False
    cleaner = Cleaner(default_steps(t2s=args.t2s, min_chars=args.min_chars, max_chars=args.max_chars,
                                    languages=languages, min_language_fraction=args.min_language_fraction,
                                    exact_dedup=not args.no_exact_dedup, near_dedup=near_dedup,
                                    near_threshold=args.near_threshold))
    sources = resolve_sources(args.inputs)  # missing files fail here, before anything is written
    texts = iter_texts(sources, args.field, config=args.hub_config, split=args.split, text_unit=args.text_unit,
                       limit=args.limit)
    written = write_jsonl(cleaner(texts), args.output)
    if cleaner.documents_in == 0:
        Path(args.output).unlink(missing_ok=True)
        raise ValueError(f"{', '.join(args.inputs)}: no documents (the corpus is empty)")
    print(cleaner.report())
    print(f"wrote {written} documents to {args.output}")
    if written == 0:
        print("sparrow data clean: warning: every document was removed; check the filters", file=sys.stderr)
    return 0


def run_builtin(args: argparse.Namespace) -> int:
    from ..data.builtin_corpus import builtin_documents, write_jsonl

    count = write_jsonl(builtin_documents(args.seed, python_docs=not args.no_python_docs), args.output)
    print(f"wrote {count} documents to {args.output}")
    return 0


def run_chats(args: argparse.Namespace) -> int:
    from ..data.builtin_corpus import chat_record, finetuning_items, write_jsonl

    count = write_jsonl((json.dumps(chat_record(i), ensure_ascii=False) for i in finetuning_items(args.seed)),
                        args.output, field=None)
    print(f"wrote {count} conversations to {args.output}")
    return 0


def run_eval_items(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ..data.builtin_corpus import eval_items

    items = eval_items(args.seed, split=args.split)
    with open(args.output, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(asdict(item), ensure_ascii=False) + "\n")
    print(f"wrote {len(items)} items to {args.output}")
    return 0
