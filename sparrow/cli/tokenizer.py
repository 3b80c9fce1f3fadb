"""``sparrow tokenizer train|merge|encode``: byte-level BPE (:mod:`sparrow.tokenizer`)."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    tok = subparsers.add_parser("tokenizer", help="train, merge and run byte-level BPE tokenizers")
    sub = tok.add_subparsers(dest="tokenizer_command", metavar="TOKENIZER_COMMAND")
    sub.required = True

    train = sub.add_parser("train", help="train a byte-level BPE tokenizer (HF tokenizers) from a corpus",
                           description="Writes OUT/tokenizer.json and OUT/tokenizer_config.json (with the chat template).")
    train.add_argument("inputs", nargs="+", metavar="IN", help="text/jsonl/parquet files, globs, directories or 'builtin'")
    train.add_argument("--output", "-o", required=True, help="output directory")
    train.add_argument("--vocab-size", type=int, default=32000)
    train.add_argument("--min-frequency", type=int, default=2)
    train.add_argument("--field", default="text", help="text column of jsonl/parquet inputs (default: text)")
    train.add_argument("--text-unit", default="document", choices=("document", "paragraph", "line"))
    train.add_argument("--special-tokens", default=None,
                       help="comma-separated special tokens (default: the Sparrow set, <|endoftext|> first)")
    train.add_argument("--limit", type=int, default=None, help="train on at most this many documents")
    train.add_argument("--split-digits", action="store_true",
                       help="one token per digit (HF Digits(individual_digits=True) ahead of ByteLevel)")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(func=_run_train)

    merge = sub.add_parser("merge", help="append EXTRA's tokens and merges that BASE lacks (BASE's ids unchanged)")
    merge.add_argument("base", metavar="BASE", help="tokenizer.json or its directory")
    merge.add_argument("extra", metavar="EXTRA", help="tokenizer.json or its directory")
    merge.add_argument("out", metavar="OUT", help="output directory (or a .json path)")
    merge.set_defaults(func=_run_merge)

    enc = sub.add_parser("encode", help="print the token ids of text (arguments or stdin)")
    enc.add_argument("--tokenizer", "-t", required=True, help="tokenizer.json (or directory) or a .tiktoken file")
    enc.add_argument("text", nargs="*", help="text to encode (default: read stdin)")
    enc.add_argument("--allow-special", action="store_true", help="encode special-token text as special tokens")
    enc.add_argument("--tokens", action="store_true", help="also print each token's text")
    enc.set_defaults(func=_run_encode)


def _run_train(args: argparse.Namespace) -> int:
    from ..data.loading import iter_texts

    from ..tokenizer import SPECIAL_TOKENS, train_tokenizer

    specials = SPECIAL_TOKENS if args.special_tokens is None else [s for s in args.special_tokens.split(",") if s]
    texts = iter_texts(args.inputs, field=args.field, text_unit=args.text_unit, limit=args.limit)
    tok = train_tokenizer(texts, vocab_size=args.vocab_size, out_dir=args.output, special_tokens=specials,
                          min_frequency=args.min_frequency, show_progress=not args.no_progress,
                          split_digits=args.split_digits)
    print(f"wrote {args.output}/tokenizer.json (vocab size {tok.get_vocab_size()}) and tokenizer_config.json")
    return 0


def _run_merge(args: argparse.Namespace) -> int:
    from ..tokenizer import merge_tokenizers

    stats = merge_tokenizers(args.base, args.extra, args.out)
    print(json.dumps(stats))
    return 0


def _run_encode(args: argparse.Namespace) -> int:
    from ..model_folder import load_tokenizer

    tok = load_tokenizer(args.tokenizer, args.tokenizer)
    text = " ".join(args.text) if args.text else sys.stdin.read()
    ids = tok.encode(text, allowed_special="all") if args.allow_special else tok.encode_ordinary(text)
    if args.tokens:
        for i in ids:
            print(i, repr(tok.id_to_token(i).decode("utf-8", errors="backslashreplace")))
    else:
        print(" ".join(map(str, ids)))
    return 0
