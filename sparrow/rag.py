"""Retrieval-augmented answers over your own documents: chunking, a BM25 index, and prompts that put the
retrieved passages before the question, laid out as the built-in reading task trains the model to read them
(``"{passage}\\n{question}"``, the passage's parts one per line; see ``sparrow.data.builtin_corpus``).

    index = build_index(["notes.md", "faq.jsonl"])          # or: sparrow rag index notes.md faq.jsonl -o idx
    index.save("idx"); index = RagIndex.load("idx")
    index.search("王明住在哪里？", k=2)                        # [(score, Chunk), ...]
    index.augment("王明住在哪里？")                             # passages, newline, the question

Design choices:

- **BM25 via bm25s** (sparse scores in numpy/scipy, saved as arrays): a well-kept library, fast to build and to
  load, with no model to download.
- **Tokens for both scripts without a dictionary**: Latin-script words and numbers, lower-cased; Chinese
  (CJK ideographs) as overlapping character bigrams plus single characters. A word segmenter such as jieba
  needs its dictionary loaded (~1 s) and splits names it has never seen unpredictably, and names are what
  most questions hinge on (the built-in world's 王明华); bigrams are the usual unit of CJK search engines
  (Lucene's CJKAnalyzer) and the single characters keep one-character words (猫, 马) findable.
- **Chunks** follow the text's own boundaries: a jsonl record or a paragraph (blank-line separated) is a unit;
  a unit longer than ``chunk_chars`` is cut between sentences, so a passage is never cut mid-sentence unless
  a single sentence is longer than a chunk.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .data.loading import iter_jsonl

_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK}]+|[^\W_{_CJK}]+")
_SENTENCE_END = re.compile(r"(?<=[.!?。！？；;])\s*|\n+")
FORMAT_VERSION = 1


def tokenize(text: str) -> list[str]:
    """BM25 terms of ``text``: lower-cased Latin-script words and numbers; for runs of Chinese characters, each
    character and each pair of neighbours."""
    terms = []
    for run in _TOKEN.findall(text.lower()):
        if re.match(rf"[{_CJK}]", run):
            terms.extend(run)
            terms.extend(run[i:i + 2] for i in range(len(run) - 1))
        else:
            terms.append(run)
    return terms


@dataclass(frozen=True)
class Chunk:
    text: str
    source: str   # file path
    line: int     # first line of the chunk in its file (1-based)


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def chunk_text(text: str, chunk_chars: int = 400) -> list[str]:
    """``text`` cut into pieces of at most ``chunk_chars`` characters between sentences (a longer sentence is a
    piece of its own)."""
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars: must be >= 1, got {chunk_chars}")
    text = text.strip()
    if len(text) <= chunk_chars:
        return [text] if text else []
    pieces, current = [], ""
    for sentence in split_sentences(text):
        # Sentences were split at their ends; Chinese ones ("。") join without a space, Latin ones with one.
        joined = f"{current} {sentence}" if current and current[-1].isascii() else current + sentence
        if current and len(joined) > chunk_chars:
            pieces.append(current)
            current = sentence
        else:
            current = joined
    if current:
        pieces.append(current)
    return pieces


def read_units(path: str | os.PathLike) -> Iterable[tuple[str, int]]:
    """(text, first line) of each unit of a document file: a jsonl record's ``text`` (or ``content``) field, or
    a paragraph of a text/markdown file. Other suffixes are refused by name."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for number, record in iter_jsonl(path):
            text = record.get("text", record.get("content")) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{number}: needs a string field 'text' (or 'content')")
            yield text, number
    elif suffix in (".txt", ".md", ".markdown", ".text"):
        lines = path.read_text(encoding="utf-8").splitlines()
        start, block = None, []
        for number, line in enumerate([*lines, ""], 1):
            if line.strip():
                start = start or number
                block.append(line)
            elif block:
                yield "\n".join(block), start
                start, block = None, []
    else:
        raise ValueError(f"{path}: unsupported document type {suffix!r} (use .txt, .md or .jsonl)")


class RagIndex:
    """Chunks and their BM25 index."""

    def __init__(self, chunks: Sequence[Chunk], retriever, settings: dict):
        self.chunks = list(chunks)
        self.retriever = retriever
        self.settings = settings

    @classmethod
    def build(cls, chunks: Sequence[Chunk], **settings) -> "RagIndex":
        import bm25s

        if not chunks:
            raise ValueError("documents: no text to index")
        retriever = bm25s.BM25()
        retriever.index([tokenize(c.text) for c in chunks], show_progress=False)
        return cls(chunks, retriever, {"format_version": FORMAT_VERSION, **settings})

    def search(self, query: str, k: int = 2) -> list[tuple[float, Chunk]]:
        """The ``k`` best chunks for ``query`` (fewer when fewer share a term with it), best first."""
        vocab = self.retriever.vocab_dict
        terms = [t for t in tokenize(query) if t in vocab]
        if not terms or k < 1:
            return []
        ids, scores = self.retriever.retrieve([terms], k=min(k, len(self.chunks)), show_progress=False)
        return [(float(s), self.chunks[int(i)]) for i, s in zip(ids[0], scores[0]) if s > 0]

    def augment(self, question: str, k: int = 2) -> str:
        """The question with the retrieved passages before it, one per line (the reading task's layout)."""
        return format_prompt([c.text for _, c in self.search(question, k)], question)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the index folder (bm25s arrays, chunks.jsonl, settings.json) through a temporary folder."""
        import shutil

        directory = Path(directory)
        tmp = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.retriever.save(str(tmp / "bm25"), show_progress=False)
        with open(tmp / "chunks.jsonl", "w", encoding="utf-8") as f:
            for chunk in self.chunks:
                f.write(json.dumps(asdict(chunk), ensure_ascii=False) + "\n")
        (tmp / "settings.json").write_text(json.dumps(self.settings, indent=2) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "RagIndex":
        import bm25s

        directory = Path(directory)
        if not (directory / "settings.json").is_file():
            raise FileNotFoundError(f"{directory}: not a retrieval index (no settings.json; build one with "
                                    "`sparrow rag index DOCS -o INDEX`)")
        settings = json.loads((directory / "settings.json").read_text())
        if settings.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory}: index format {settings.get('format_version')}, this Sparrow reads "
                             f"{FORMAT_VERSION}: rebuild it")
        chunks = [Chunk(**json.loads(line)) for line in
                  (directory / "chunks.jsonl").read_text(encoding="utf-8").splitlines()]
        retriever = bm25s.BM25.load(str(directory / "bm25"), show_progress=False)
        return cls(chunks, retriever, settings)


def format_prompt(passages: Sequence[str], question: str) -> str:
    return "\n".join([*passages, question]) if passages else question


def build_index(paths: Sequence[str | os.PathLike], chunk_chars: int = 400) -> RagIndex:
    chunks = [Chunk(piece, str(path), line)
              for path in paths for text, line in read_units(path) for piece in chunk_text(text, chunk_chars)]
    return RagIndex.build(chunks, chunk_chars=chunk_chars, sources=[str(p) for p in paths])


# --------------------------------------------------------------------------------------- evaluation

def world_documents(seed: int = 0, num_people: int = 240) -> list[dict]:
    """The built-in world's people as documents: one biography per person and language (one paraphrase of
    each fact), as the reading task's passages write them. Records ``{"text", "person"}``."""
    import random

    from .data.builtin_corpus import World

    world = World(seed, num_people)
    rng = random.Random(f"sparrow-rag-docs-{seed}")
    return [{"text": world.biography(p, lang, rng), "person": i}
            for i, p in enumerate(world.people) for lang in ("en", "zh")]


def facts_queries(seed: int = 0, num_people: int = 240, split: str = "heldout") -> list[tuple[int, object]]:
    """(person index, EvalItem) of the world's fact questions (``split``: "heldout", "seen" or "all")."""
    from .data.builtin_corpus import World

    world = World(seed, num_people)
    return [(i, item) for i in range(num_people) for item in world.questions(i)
            if split == "all" or item.split == split]


def evaluate_rag(loaded, index: RagIndex, queries, people_of_chunk: Sequence[int], *, k: int = 2,
                 max_tokens: int = 16) -> dict:
    """Retrieval hit rate (a chunk about the asked person among the top ``k``) and exact match of the model's
    greedy chat answers (:func:`sparrow.evaluate.exact_match`) with and without the retrieved passages: overall,
    by language and question kind, and the paired counts with McNemar's exact test (:func:`mcnemar_p`)."""
    import dataclasses

    from .serving.adapter import exact_match

    position = {id(c): n for n, c in enumerate(index.chunks)}
    hits, opened = 0, []
    for person, item in queries:
        found = index.search(item.question, k)
        hits += any(people_of_chunk[position[id(c)]] == person for _, c in found)
        opened.append(dataclasses.replace(item, question=format_prompt([c.text for _, c in found], item.question)))
    closed = [item for _, item in queries]
    template = loaded.template_name
    result = {"questions": len(queries), "k": k, "retrieval_hit_rate": hits / max(len(queries), 1)}
    correct = {}
    for name, items in (("without_retrieval", closed), ("with_retrieval", opened)):
        scored = exact_match(loaded.model, loaded.tokenizer, items, chat_template=template, max_new_tokens=max_tokens)
        correct[name] = scored["correct"]
        result[f"exact_match_{name}"] = scored["exact_match"]
        result[f"samples_{name}"] = [{"question": i.question, "expected": i.answer, "got": a}
                                     for i, a in list(zip(items, scored["answers"]))[:3]]
    only_with = sum(w and not o for w, o in zip(correct["with_retrieval"], correct["without_retrieval"]))
    only_without = sum(o and not w for w, o in zip(correct["with_retrieval"], correct["without_retrieval"]))
    result.update(right_only_with_retrieval=only_with, right_only_without_retrieval=only_without,
                  mcnemar_p=mcnemar_p(only_with, only_without))
    groups: dict[str, list[tuple[bool, bool]]] = {}
    for item, o, w in zip(closed, correct["without_retrieval"], correct["with_retrieval"]):
        groups.setdefault(f"{item.lang} {item.kind}", []).append((o, w))
    result["by_question_kind"] = {
        name: {"questions": len(pairs), "without_retrieval": sum(o for o, _ in pairs) / len(pairs),
               "with_retrieval": sum(w for _, w in pairs) / len(pairs)} for name, pairs in sorted(groups.items())}
    return result


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar test of paired right/wrong outcomes: the probability, if both conditions were
    equally good, of a split of the ``b + c`` discordant questions at least as uneven as ``b`` : ``c``
    (binomial with p = 1/2)."""
    from math import comb

    if b < 0 or c < 0:
        raise ValueError(f"b, c: counts must be >= 0, got {b}, {c}")
    n = b + c
    return min(1.0, 2 * sum(comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n) if n else 1.0


def training_records(count: int, *, eval_seed: int = 0, num_people: int = 240, max_passages: int = 2,
                     questions: int = 1) -> list[dict]:
    """Chat records (``{"messages"}``, for ``sparrow sft``) that teach answering from retrieved passages, in the
    layout :meth:`RagIndex.augment` gives: 1 to ``max_passages`` biographies, the asked person's among them at
    a random place, then a question about that person. With ``questions`` > 1 the user goes on asking about
    the same person's other facts, one per turn (up to 5): more answers to learn from per passage read, each
    found only in the passage. The people come from other worlds than ``eval_seed``'s, so an evaluation on that
    world asks about people never trained on."""
    import random

    from .data.builtin_corpus import ATTRIBUTES, World

    if not 1 <= questions <= len(ATTRIBUTES):
        raise ValueError(f"questions: must be between 1 and {len(ATTRIBUTES)}, got {questions}")
    if max_passages < 1:
        raise ValueError(f"max_passages: must be >= 1, got {max_passages}")
    rng = random.Random(f"sparrow-rag-records-{eval_seed}")
    records, world_seed = [], eval_seed
    while len(records) < count:
        world_seed += 1
        world = World(world_seed, num_people)
        for _ in range(min(count - len(records), num_people * 4)):
            lang = rng.choice(("en", "zh"))
            people = rng.sample(world.people, rng.randint(1, max_passages))
            passages = [world.biography(p, lang, rng) for p in people]
            rng.shuffle(passages)
            messages = []
            for n, kind in enumerate(rng.sample(ATTRIBUTES, questions)):
                question, answer = world.question(people[0], kind, lang)
                messages += [{"role": "user", "content": format_prompt(passages, question) if n == 0 else question},
                             {"role": "assistant", "content": answer}]
            records.append({"messages": messages})
    return records
