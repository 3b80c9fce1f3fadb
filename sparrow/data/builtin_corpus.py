"""A corpus that needs no download, so ``sparrow pretrain`` runs anywhere Python does.

Two parts:

* **Python's own documentation**: the ``pydoc`` help topics (``pydoc_data.topics``) and the docstrings of the
  standard library's top-level modules, read with :mod:`ast` rather than imported (importing every stdlib module
  has side effects: ``antigravity`` opens a browser, ``this`` prints). Real English prose with a long tail.
* **A generated bilingual world** (English and Chinese), seeded: arithmetic stated in sentences, facts about
  fictional people (city, age, job, favourite colour, pet), and reading passages (two short biographies, then
  questions answered from them). It is built so later stages can *measure* learning: :func:`eval_items` returns
  question/answer pairs whose exact question never appears in the training text, in three tasks:
  ``arithmetic`` (operand pairs held out entirely: generalisation), ``facts`` (questions about people whose
  facts are stated only as prose in training: knowledge extraction, as in "Physics of Language Models" 3.1) and
  ``reading`` (passages about people whose names never occur in training: the answer is in the prompt, so this
  is the task a model of a few million parameters can learn in minutes).

Everything generated depends only on ``seed``, through one :class:`random.Random` per part, so the corpus and
the evaluation items are reproducible across machines and Python versions of the same minor release (the
documentation part follows the running Python's stdlib).
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import sys
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

# ----------------------------------------------------------------------------------- Python documentation

# Test suites and tool packages are mostly code and fixtures, not prose.
_SKIP_MODULES = {"test", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "this", "antigravity"}


def pydoc_topics() -> list[str]:
    """The interactive ``help()`` topics shipped with Python (the language reference, in plain text)."""
    from pydoc_data.topics import topics

    return [topics[key].strip() for key in sorted(topics) if topics[key].strip()]


def stdlib_docstrings(min_chars: int = 80) -> list[str]:
    """Docstrings (module, class, function) of the standard library's top-level modules, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    for name in sorted(sys.stdlib_module_names):
        if name in _SKIP_MODULES or name.startswith("_"):
            continue
        for path in (root / f"{name}.py", root / name / "__init__.py"):
            if not path.is_file():
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= min_chars:
                        texts.append(doc.strip())
    return texts


# ----------------------------------------------------------------------------------------- generated world

@dataclass(frozen=True)
class Person:
    name_en: str
    name_zh: str
    city: int  # index into World.cities
    age: int
    job: int
    color: int
    pet: int


@dataclass(frozen=True)
class EvalItem:
    """One exact-match evaluation question. ``prompt`` is what a pretrained model is given (ending right before
    the answer, as the training text is laid out); ``question`` is the same question as a chat user turn (no
    "Question:/Answer:" frame); ``answer`` is the expected continuation, stripped."""

    prompt: str
    answer: str
    lang: str  # "en" | "zh"
    # "add" | "sub" | "mul" | "city" | "age" | "job" | "color" | "pet" | "read_city" | ... | "read_pet"
    kind: str
    split: str  # "heldout": never asked in training; "seen": asked in the training text; "train": for fine-tuning
    question: str

    @property
    def task(self) -> str:
        """"arithmetic", "facts" (closed-book questions about the world's people) or "reading" (answer in the prompt)."""
        if self.kind in ("add", "sub", "mul"):
            return "arithmetic"
        return "reading" if self.kind.startswith("read_") else "facts"


TASKS = ("facts", "arithmetic", "reading")
ATTRIBUTES = ("city", "age", "job", "color", "pet")


JOBS = [("teacher", "教师"), ("baker", "面包师"), ("doctor", "医生"), ("farmer", "农民"), ("painter", "画家"),
        ("engineer", "工程师"), ("sailor", "水手"), ("librarian", "图书管理员"), ("musician", "音乐家"),
        ("gardener", "园丁"), ("carpenter", "木匠"), ("pilot", "飞行员")]
COLORS = [("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"), ("purple", "紫色"),
          ("white", "白色"), ("black", "黑色"), ("orange", "橙色")]
# (English, Chinese, Chinese measure word)
PETS = [("cat", "猫", "只"), ("dog", "狗", "条"), ("parrot", "鹦鹉", "只"), ("rabbit", "兔子", "只"),
        ("goldfish", "金鱼", "条"), ("turtle", "乌龟", "只"), ("horse", "马", "匹"), ("hamster", "仓鼠", "只")]

_EN_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "st", "th", "sh"]
_EN_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
_EN_CODAS = ["", "", "n", "r", "l", "s", "th", "m", "x"]
_ZH_SURNAMES = "王李张刘陈杨赵黄周吴徐孙胡朱高林何郭马罗梁宋郑谢韩唐冯于董萧程曹袁邓许傅沈曾彭吕"
_ZH_GIVEN = "明华强伟芳丽静磊洋勇军杰娟涛斌超平刚英玲霞秀兰飞鹏辉文建国云峰宇晨"
_CITY_EN_HEAD = ["Dun", "Ash", "Bel", "Cor", "Elm", "Fal", "Gar", "Hol", "Iver", "Kel", "Lor", "Mar"]
_CITY_EN_TAIL = ["more", "ford", "haven", "wick"]
_CITY_ZH_HEAD = "青白金云石松月风海星"
_CITY_ZH_TAIL = "川溪林岭湖港原桥"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class World:
    """The fictional people and cities, and the split of people into those asked about in training
    ("seen") and those only described ("heldout")."""

    def __init__(self, seed: int = 0, num_people: int = 240, heldout_fraction: float = 0.2):
        rng = random.Random(f"sparrow-world-{seed}")
        heads = rng.sample(_CITY_EN_HEAD, len(_CITY_EN_HEAD))
        zh_pairs = [a + b for a in _CITY_ZH_HEAD for b in _CITY_ZH_TAIL]
        rng.shuffle(zh_pairs)
        self.cities = [(heads[i] + _CITY_EN_TAIL[i % len(_CITY_EN_TAIL)], zh_pairs[i] + "城") for i in range(len(heads))]
        self._names: set[str] = set()
        self._name_prefixes: set[str] = set()
        self.people = [self.new_person(rng) for _ in range(num_people)]
        order = list(range(num_people))
        rng.shuffle(order)
        self.heldout = set(order[: round(num_people * heldout_fraction)])

    def new_person(self, rng: random.Random) -> Person:
        """A person whose names are neither a prefix of, nor extended by, a name this world has made so far
        ("王明" and "王明华" are two people, but text about the second would contain the first)."""
        while True:
            en = f"{self._en_word(rng)} {self._en_word(rng)}"
            zh = rng.choice(_ZH_SURNAMES) + "".join(rng.choice(_ZH_GIVEN) for _ in range(rng.choice((1, 2))))
            if not any(self._clashes(name) for name in (en, zh)):
                break
        for name in (en, zh):
            self._names.add(name)
            self._name_prefixes.update(name[:k] for k in range(1, len(name) + 1))
        return Person(en, zh, rng.randrange(len(self.cities)), rng.randint(18, 80), rng.randrange(len(JOBS)),
                      rng.randrange(len(COLORS)), rng.randrange(len(PETS)))

    def _clashes(self, name: str) -> bool:
        return name in self._name_prefixes or any(name[:k] in self._names for k in range(1, len(name)))

    @staticmethod
    def _en_word(rng: random.Random) -> str:
        syllables = rng.choice((2, 2, 3))
        word = "".join(rng.choice(_EN_ONSETS) + rng.choice(_EN_VOWELS) for _ in range(syllables)) + rng.choice(_EN_CODAS)
        return word.capitalize()

    # Statements: several paraphrases each, so facts are seen in varied form (which is what lets a model
    # answer questions about them rather than only recite one sentence).
    def statements(self, p: Person, lang: str) -> list[list[str]]:
        city_en, city_zh = self.cities[p.city]
        job_en, job_zh = JOBS[p.job]
        color_en, color_zh = COLORS[p.color]
        pet_en, pet_zh, measure = PETS[p.pet]
        n = p.name_en if lang == "en" else p.name_zh
        # The English and Chinese tables below have the same shape on purpose: parallel text, not repeated logic.
        if lang == "en":
            return [
                [f"{n} lives in {city_en}.", f"{n} has made a home in {city_en}.", f"The city of {city_en} is where {n} lives."],
                [f"{n} is {p.age} years old.", f"{n} is aged {p.age}.", f"At {p.age} years of age, {n} is well known to the neighbours."],
                [f"{n} works as {_article(job_en)} {job_en}.", f"By trade, {n} is {_article(job_en)} {job_en}.", f"{n} earns a living as {_article(job_en)} {job_en}."],
                [f"{n}'s favorite color is {color_en}.", f"{n} likes {color_en} more than any other color.", f"Of all colors, {n} prefers {color_en}."],
                [f"{n} has a pet {pet_en}.", f"{n} keeps {_article(pet_en)} {pet_en} at home.", f"{n} looks after {_article(pet_en)} {pet_en}."],
            ]
        return [
            [f"{n}住在{city_zh}。", f"{n}的家在{city_zh}。", f"{n}生活在{city_zh}。"],
            [f"{n}今年{p.age}岁。", f"{n}的年龄是{p.age}岁。", f"{n}已经{p.age}岁了。"],
            [f"{n}是一名{job_zh}。", f"{n}的职业是{job_zh}。", f"{n}靠做{job_zh}为生。"],
            [f"{n}最喜欢的颜色是{color_zh}。", f"{n}喜欢{color_zh}。", f"在所有颜色里，{n}最爱{color_zh}。"],
            [f"{n}养了一{measure}{pet_zh}。", f"{n}的宠物是{pet_zh}。", f"{n}家里有一{measure}{pet_zh}。"],
        ]

    def question(self, p: Person, kind: str, lang: str) -> tuple[str, str]:
        """(question, answer) about one attribute of ``p``."""
        city_en, city_zh = self.cities[p.city]
        en, zh = p.name_en, p.name_zh
        rows = {
            "city": (f"Where does {en} live?", city_en, f"{zh}住在哪里？", city_zh),
            "age": (f"How old is {en}?", str(p.age), f"{zh}多少岁？", f"{p.age}岁"),
            "job": (f"What does {en} do for a living?", JOBS[p.job][0], f"{zh}的职业是什么？", JOBS[p.job][1]),
            "color": (f"What is {en}'s favorite color?", COLORS[p.color][0], f"{zh}最喜欢什么颜色？", COLORS[p.color][1]),
            "pet": (f"What pet does {en} have?", PETS[p.pet][0], f"{zh}养了什么宠物？", PETS[p.pet][1]),
        }
        q_en, a_en, q_zh, a_zh = rows[kind]
        return (q_en, a_en) if lang == "en" else (q_zh, a_zh)

    def questions(self, index: int) -> list[EvalItem]:
        p = self.people[index]
        split = "heldout" if index in self.heldout else "seen"
        items = []
        for kind in ATTRIBUTES:
            for lang in ("en", "zh"):
                question, answer = self.question(p, kind, lang)
                items.append(EvalItem(qa_prompt(question, lang), answer, lang, kind, split, question))
        return items

    def biography(self, p: Person, lang: str, rng: random.Random) -> str:
        """One paraphrase of each of ``p``'s facts, in random order."""
        facts = [rng.choice(options) for options in self.statements(p, lang)]
        rng.shuffle(facts)
        return (" " if lang == "en" else "").join(facts)


def qa_prompt(question: str, lang: str) -> str:
    return f"Question: {question}\nAnswer:" if lang == "en" else f"问题：{question}\n答案："


def qa_text(item: EvalItem) -> str:
    return f"{item.prompt} {item.answer}." if item.lang == "en" else f"{item.prompt}{item.answer}。"


def _world_documents(world: World, rng: random.Random, bios_per_person: int) -> list[str]:
    docs = []
    # One document per person and language, a few paraphrased biographies long: longer documents pack into
    # fewer segments per row, which is what the attention cost of packed batches grows with.
    for p in world.people:
        for lang in ("en", "zh"):
            bios = []
            for _ in range(bios_per_person):
                bios.append(world.biography(p, lang, rng))
            if lang == "en":
                bios.append(f"{p.name_en}'s Chinese name is {p.name_zh}.")
            else:
                bios.append(f"{p.name_zh}的英文名字是{p.name_en}。")
            docs.append("\n".join(bios))
    # Question-and-answer drills about the "seen" people teach the format the held-out questions use.
    seen = [item for i in range(len(world.people)) if i not in world.heldout for item in world.questions(i)]
    rng.shuffle(seen)
    for start in range(0, len(seen), 16):
        docs.append("\n".join(qa_text(item) for item in seen[start : start + 16]))
    return docs


# ------------------------------------------------------------------------------------------- arithmetic

def heldout_operand_pairs(seed: int) -> dict[str, set[tuple[int, int]]]:
    """Unordered operand pairs never stated in training, so commutativity cannot leak the answer's sentence."""
    rng = random.Random(f"sparrow-arith-heldout-{seed}")
    add = {tuple(sorted(rng.sample(range(10, 100), 2))) for _ in range(120)}
    mul = {tuple(sorted((rng.randint(2, 12), rng.randint(2, 12)))) for _ in range(12)}
    return {"add": add, "sub": add, "mul": mul}


def arithmetic_item(op: str, a: int, b: int, lang: str, split: str = "heldout") -> EvalItem:
    if op == "add":
        q, r = (f"What is {a} plus {b}?", f"{a} 加 {b} 等于多少？"), a + b
    elif op == "sub":
        q, r = (f"What is {a} minus {b}?", f"{a} 减 {b} 等于多少？"), a - b
    else:
        q, r = (f"What is {a} times {b}?", f"{a} 乘以 {b} 等于多少？"), a * b
    question = q[0] if lang == "en" else q[1]
    return EvalItem(qa_prompt(question, lang), str(r), lang, op, split, question)


def _arith_sentence(rng: random.Random, heldout: dict[str, set[tuple[int, int]]], lang: str) -> str:
    while True:
        op = rng.choice(("add", "add", "sub", "mul"))
        if op == "mul":
            a, b = rng.randint(0, 12), rng.randint(0, 12)
        else:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            if op == "sub" and a < b:
                a, b = b, a
        if tuple(sorted((a, b))) not in heldout[op]:
            break
    form = rng.randrange(3)
    if form == 0:  # question and answer, the layout of the evaluation prompts
        return qa_text(arithmetic_item(op, a, b, lang))
    word_en = {"add": "plus", "sub": "minus", "mul": "times"}[op]
    word_zh = {"add": "加", "sub": "减", "mul": "乘以"}[op]
    r = {"add": a + b, "sub": a - b, "mul": a * b}[op]
    if lang == "en":
        return f"{a} {word_en} {b} equals {r}." if form == 1 else f"If you take {a} {word_en} {b}, you get {r}."
    return f"{a} {word_zh} {b} 等于 {r}。" if form == 1 else f"{a} {word_zh} {b} 的结果是 {r}。"


def _arithmetic_documents(rng: random.Random, seed: int, num_docs: int, lines_per_doc: int = 20) -> list[str]:
    heldout = heldout_operand_pairs(seed)
    docs = []
    for _ in range(num_docs):
        lang = rng.choice(("en", "zh"))
        docs.append("\n".join(_arith_sentence(rng, heldout, lang) for _ in range(lines_per_doc)))
    return docs


def arithmetic_items(seed: int, count: int) -> list[EvalItem]:
    """``count`` arithmetic questions (split "train") on operand pairs the corpus may state, never the held-out
    ones: fine-tuning data for the arithmetic task."""
    rng = random.Random(f"sparrow-arith-train-{seed}")
    heldout = heldout_operand_pairs(seed)
    items = []
    while len(items) < count:
        op = rng.choice(("add", "sub", "mul"))
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "mul" else (rng.randint(10, 99), rng.randint(10, 99))
        if op == "sub" and a < b:
            a, b = b, a
        if tuple(sorted((a, b))) in heldout[op]:
            continue
        items.append(arithmetic_item(op, a, b, rng.choice(("en", "zh")), split="train"))
    return items


# ---------------------------------------------------------------------------------------------- reading

# People of the reading passages, apart from the world's: "train" people appear in the corpus's passages and in
# fine-tuning data; "heldout" people never appear in training, so their questions can only be answered by
# reading the passage.
_READING_PEOPLE = {"train": 3000, "heldout": 600}


@lru_cache(maxsize=4)
def _reading_world(seed: int, num_people: int) -> tuple[World, dict[str, tuple[Person, ...]]]:
    world = World(seed, num_people)  # new_person avoids the world's names and each earlier reading person's
    pools = {}
    for split, size in _READING_PEOPLE.items():
        rng = random.Random(f"sparrow-reading-people-{split}-{seed}")
        pools[split] = tuple(world.new_person(rng) for _ in range(size))
    return world, pools


def _passage(world: World, people: Sequence[Person], lang: str, rng: random.Random) -> str:
    return "\n".join(world.biography(p, lang, rng) for p in people)


def _reading_item(world: World, pool: Sequence[Person], rng: random.Random, split: str) -> EvalItem:
    lang = rng.choice(("en", "zh"))
    people = rng.sample(pool, 2)
    passage = _passage(world, people, lang, rng)
    kind = rng.choice(ATTRIBUTES)
    question, answer = world.question(rng.choice(people), kind, lang)
    return EvalItem(f"{passage}\n{qa_prompt(question, lang)}", answer, lang, f"read_{kind}", split,
                    f"{passage}\n{question}")


def reading_items(seed: int = 0, *, split: str = "heldout", count: int = 480, num_people: int = 240) -> list[EvalItem]:
    """``count`` reading questions: a passage of two short biographies, then a question about one of the two.
    ``split="heldout"``: people who never occur in the training text; ``"train"``: people of the corpus's
    passages, for fine-tuning."""
    if split not in ("heldout", "train"):
        raise ValueError(f"split: must be 'heldout' or 'train', got {split!r}")
    world, pools = _reading_world(seed, num_people)
    rng = random.Random(f"sparrow-reading-items-{split}-{seed}")
    return [_reading_item(world, pools[split], rng, split) for _ in range(count)]


def _reading_documents(seed: int, num_people: int, rng: random.Random, num_docs: int,
                       questions_per_doc: int = 3) -> list[str]:
    world, pools = _reading_world(seed, num_people)
    docs = []
    for _ in range(num_docs):
        lang = rng.choice(("en", "zh"))
        people = rng.sample(pools["train"], 2)
        lines = [_passage(world, people, lang, rng)]
        for kind in rng.sample(ATTRIBUTES, questions_per_doc):
            question, answer = world.question(rng.choice(people), kind, lang)
            lines.append(qa_text(EvalItem(qa_prompt(question, lang), answer, lang, kind, "train", question)))
        docs.append("\n".join(lines))
    return docs


# ----------------------------------------------------------------------------------------------- public

def generated_documents(seed: int = 0, *, num_people: int = 240, bios_per_person: int = 3,
                        arithmetic_docs: int = 1000, reading_docs: int = 1000) -> list[str]:
    """The generated bilingual documents (world facts, arithmetic, reading passages), shuffled together,
    deterministic in seed."""
    world = World(seed, num_people)
    rng = random.Random(f"sparrow-corpus-{seed}")
    docs = _world_documents(world, rng, bios_per_person) + _arithmetic_documents(rng, seed, arithmetic_docs)
    docs += _reading_documents(seed, num_people, random.Random(f"sparrow-reading-docs-{seed}"), reading_docs)
    rng.shuffle(docs)
    return docs


def builtin_documents(seed: int = 0, *, python_docs: bool = True, num_people: int = 240, bios_per_person: int = 3,
                      arithmetic_docs: int = 1000, reading_docs: int = 1000) -> list[str]:
    """The whole built-in corpus: Python's documentation (if ``python_docs``) then the generated documents,
    interleaved deterministically."""
    docs = generated_documents(seed, num_people=num_people, bios_per_person=bios_per_person,
                               arithmetic_docs=arithmetic_docs, reading_docs=reading_docs)
    if python_docs:
        docs = _cached_python_docs() + docs
        random.Random(f"sparrow-mix-{seed}").shuffle(docs)
    return docs


@lru_cache(maxsize=1)
def _cached_python_docs() -> list[str]:
    # Parsing the stdlib takes a few seconds; tests and the pipeline ask more than once per process.
    return pydoc_topics() + stdlib_docstrings()


def eval_items(seed: int = 0, *, num_people: int = 240, split: str = "heldout", reading: int = 480) -> list[EvalItem]:
    """Exact-match question/answer items about the generated part of the corpus with the same ``seed``.

    ``split="heldout"``: questions that never appear in the training text: arithmetic on held-out operand pairs,
    questions about people whose facts appear only as statements, and ``reading`` passages about people who never
    occur in training. ``split="seen"``: questions asked (with their answers) in the training text, a
    memorisation baseline. ``split="all"``: both.
    """
    if split not in ("heldout", "seen", "all"):
        raise ValueError(f"split: must be 'heldout', 'seen' or 'all', got {split!r}")
    world = World(seed, num_people)
    items = [item for i in range(len(world.people)) for item in world.questions(i)]
    pairs = heldout_operand_pairs(seed)
    for op in ("add", "sub", "mul"):
        for a, b in sorted(pairs[op]):
            if op == "sub":
                a, b = b, a  # larger first: the training text only subtracts down to zero
            for lang in ("en", "zh"):
                items.append(arithmetic_item(op, a, b, lang))
    items += reading_items(seed, split="heldout", count=reading, num_people=num_people)
    return [item for item in items if split == "all" or item.split == split]


def finetuning_items(seed: int = 0, *, num_people: int = 240) -> list[EvalItem]:
    """Questions for fine-tuning, none held out: those the corpus asks about its "seen" people, half as many on
    arithmetic operand pairs the corpus may state, and half as many on reading passages about the corpus's
    passage people."""
    seen = eval_items(seed, num_people=num_people, split="seen", reading=0)
    return (seen + arithmetic_items(seed, len(seen) // 2)
            + reading_items(seed, split="train", count=len(seen) // 2, num_people=num_people))


@lru_cache(maxsize=4)
def _answer_values(seed: int, num_people: int) -> dict[tuple[str, str], frozenset[str]]:
    cities = World(seed, num_people).cities
    values = {}
    for lang, column in (("en", 0), ("zh", 1)):
        values["city", lang] = frozenset(c[column] for c in cities)
        values["job", lang] = frozenset(j[column] for j in JOBS)
        values["color", lang] = frozenset(c[column] for c in COLORS)
        values["pet", lang] = frozenset(p[column] for p in PETS)
    return values


def answer_has_the_asked_type(item: EvalItem, answer: str, seed: int = 0, num_people: int = 240) -> bool:
    """Whether ``answer`` is a value of the kind ``item`` asks for (a city for a city question, a number for
    arithmetic, "N岁" for a Chinese age question), right or not: what a model that has learned the task's answer
    format, but not the answer, gets right."""
    answer = answer.strip()
    kind = item.kind.removeprefix("read_")
    if kind in ("add", "sub", "mul"):
        return re.fullmatch(r"-?\d+", answer) is not None
    if kind == "age":
        return re.fullmatch(r"\d+岁" if item.lang == "zh" else r"\d+", answer) is not None
    return answer in _answer_values(seed, num_people)[kind, item.lang]


def chat_record(item: EvalItem) -> dict:
    """``item`` as a one-turn conversation (the ``messages`` jsonl that ``sparrow sft`` reads)."""
    return {"messages": [{"role": "user", "content": item.question}, {"role": "assistant", "content": item.answer}]}


def write_jsonl(docs: Iterable[str], path: str | os.PathLike, field: str | None = "text") -> int:
    """Write documents as JSON lines (``{field: text}``; with ``field=None`` each is already a JSON line),
    atomically; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    count = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write((doc if field is None else json.dumps({field: doc}, ensure_ascii=False)) + "\n")
            count += 1
    os.replace(tmp, path)
    return count
