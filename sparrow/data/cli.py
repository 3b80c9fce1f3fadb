"""``sparrow data``: clean a corpus, write the built-in corpus or its evaluation items; ``tokenize`` is added by
:mod:`sparrow.tokenizer.corpus` when that module is present."""

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

    try:
        from sparrow.tokenizer.corpus import register_data_commands
    except ImportError:
        pass  # tokenization ships with sparrow.tokenizer; without it `data` still cleans
    else:
        register_data_commands(data_sub)


def run_clean(args: argparse.Namespace) -> int:
    from .builtin_corpus import write_jsonl
    from .cleaning import Cleaner, default_steps
    from .loading import iter_texts, resolve_sources

    languages = None if args.languages.strip().lower() in ("", "any", "none") else [
        s.strip() for s in args.languages.split(",") if s.strip()]
    cleaner = Cleaner(default_steps(t2s=args.t2s, min_chars=args.min_chars, max_chars=args.max_chars,
                                    languages=languages, min_language_fraction=args.min_language_fraction,
                                    exact_dedup=not args.no_exact_dedup, near_dedup=not args.no_near_dedup,
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
    from .builtin_corpus import builtin_documents, write_jsonl

    count = write_jsonl(builtin_documents(args.seed, python_docs=not args.no_python_docs), args.output)
    print(f"wrote {count} documents to {args.output}")
    return 0


def run_chats(args: argparse.Namespace) -> int:
    from .builtin_corpus import chat_record, finetuning_items, write_jsonl

    count = write_jsonl((json.dumps(chat_record(i), ensure_ascii=False) for i in finetuning_items(args.seed)),
                        args.output, field=None)
    print(f"wrote {count} conversations to {args.output}")
    return 0


def run_eval_items(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .builtin_corpus import eval_items

    items = eval_items(args.seed, split=args.split)
    with open(args.output, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(asdict(item), ensure_ascii=False) + "\n")
    print(f"wrote {len(items)} items to {args.output}")
    return 0
