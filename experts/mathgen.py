"""Deterministic grade-school word problems with worked solutions and an integer answer.

Text format of one problem (what the `math` preset trains on; evals parse the last integer):

    Question: <question>
    Answer: <step>. <step>. ... The answer is <N>.

`MathProblem.prompt` is the part up to and including "Answer:", `MathProblem.text` the whole.
Train and held-out are disjoint by construction: a question belongs to the held-out split iff
the first byte of its sha256 is odd, and each split draws from its own RNG stream and skips
questions of the other split and duplicates.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from xmerge.errors import XmergeError

Split = Literal["train", "heldout"]

NAMES = [
    "Ava", "Ben", "Carla", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jamal",
    "Kira", "Liam", "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tara",
]
ITEMS = [
    ("notebook", "notebooks"), ("apple", "apples"), ("pencil", "pencils"), ("ticket", "tickets"),
    ("sandwich", "sandwiches"), ("book", "books"), ("candle", "candles"), ("mug", "mugs"),
    ("plant", "plants"), ("toy car", "toy cars"), ("scarf", "scarves"), ("muffin", "muffins"),
]
SHAREABLES = ["stickers", "marbles", "cookies", "cards", "beads", "stamps", "grapes", "coins"]


@dataclass(frozen=True)
class MathProblem:
    question: str
    solution: str  # worked steps, ending in "The answer is N."
    answer: int

    @property
    def prompt(self) -> str:
        return f"Question: {self.question}\nAnswer:"

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.solution}"


def _shopping(r: random.Random) -> tuple[str, list[str], int]:
    name, (item, items) = r.choice(NAMES), r.choice(ITEMS)
    count, price = r.randint(2, 12), r.randint(2, 25)
    cost = count * price
    bill = r.choice([b for b in (20, 50, 100, 200, 500) if b > cost])
    question = (f"{name} buys {count} {items} at ${price} each and pays with a ${bill} bill. "
                f"How many dollars of change does {name} get?")
    steps = [f"The {items} cost {count} * {price} = {cost} dollars",
             f"The change is {bill} - {cost} = {bill - cost} dollars"]
    return question, steps, bill - cost


def _sharing(r: random.Random) -> tuple[str, list[str], int]:
    name, thing = r.choice(NAMES), r.choice(SHAREABLES)
    friends, each, kept = r.randint(2, 9), r.randint(2, 15), r.randint(1, 20)
    total = friends * each + kept
    question = (f"{name} has {total} {thing}. {name} keeps {kept} and shares the rest equally "
                f"among {friends} friends. How many {thing} does each friend get?")
    steps = [f"{name} shares {total} - {kept} = {total - kept} {thing}",
             f"Each friend gets {total - kept} / {friends} = {each} {thing}"]
    return question, steps, each


def _rate(r: random.Random) -> tuple[str, list[str], int]:
    name = r.choice(NAMES)
    if r.random() < 0.5:
        speed, hours, extra = r.randint(20, 90), r.randint(2, 8), r.randint(5, 60)
        question = (f"{name} drives at {speed} kilometers per hour for {hours} hours and then "
                    f"walks {extra} more kilometers. How many kilometers does {name} travel in total?")
        driven = speed * hours
        steps = [f"Driving covers {speed} * {hours} = {driven} kilometers",
                 f"In total {driven} + {extra} = {driven + extra} kilometers"]
        return question, steps, driven + extra
    per_minute, minutes = r.randint(3, 30), r.randint(2, 40)
    target = per_minute * minutes
    question = (f"A machine at {name}'s workshop makes {per_minute} parts per minute. "
                f"How many minutes does it take to make {target} parts?")
    steps = [f"It takes {target} / {per_minute} = {minutes} minutes"]
    return question, steps, minutes


def _multi_step(r: random.Random) -> tuple[str, list[str], int]:
    name, thing = r.choice(NAMES), r.choice(SHAREABLES)
    start, packs, per_pack = r.randint(5, 80), r.randint(2, 9), r.randint(3, 12)
    bought = packs * per_pack
    given = r.randint(1, start + bought - 1)
    left = start + bought - given
    question = (f"{name} had {start} {thing}. {name} bought {packs} packs of {per_pack} {thing} each "
                f"and then gave away {given}. How many {thing} does {name} have now?")
    steps = [f"The packs hold {packs} * {per_pack} = {bought} {thing}",
             f"{name} then has {start} + {bought} = {start + bought} {thing}",
             f"After giving away {given}, {start + bought} - {given} = {left} are left"]
    return question, steps, left


def _earnings(r: random.Random) -> tuple[str, list[str], int]:
    name = r.choice(NAMES)
    wage, hours, days = r.randint(8, 30), r.randint(2, 8), r.randint(2, 6)
    earned = wage * hours * days
    spent = r.randint(1, earned - 1)
    question = (f"{name} earns ${wage} per hour and works {hours} hours a day for {days} days, "
                f"then spends ${spent}. How many dollars does {name} have left?")
    steps = [f"Each day {name} earns {wage} * {hours} = {wage * hours} dollars",
             f"Over {days} days that is {wage * hours} * {days} = {earned} dollars",
             f"After spending, {earned} - {spent} = {earned - spent} dollars are left"]
    return question, steps, earned - spent


def _bags(r: random.Random) -> tuple[str, list[str], int]:
    name, (_, items) = r.choice(NAMES), r.choice(ITEMS)
    per_bag, bags, price = r.randint(2, 12), r.randint(2, 20), r.randint(1, 15)
    total = per_bag * bags
    question = (f"{name} packs {total} {items} into bags of {per_bag} and sells each bag for ${price}. "
                f"How many dollars does {name} get for all the bags?")
    steps = [f"There are {total} / {per_bag} = {bags} bags",
             f"They sell for {bags} * {price} = {bags * price} dollars"]
    return question, steps, bags * price


TEMPLATES: list[Callable[[random.Random], tuple[str, list[str], int]]] = [
    _shopping, _sharing, _rate, _multi_step, _earnings, _bags,
]


def split_of(question: str) -> Split:
    """The split a question belongs to, fixed by its text alone."""
    return "heldout" if hashlib.sha256(question.encode()).digest()[0] & 1 else "train"


def iter_math_problems(split: Split, seed: int = 0) -> Iterator[MathProblem]:
    """An endless, deterministic stream of distinct problems of one split."""
    if split not in ("train", "heldout"):
        raise XmergeError(f"unknown math split {split!r}: use 'train' or 'heldout'")
    rng = random.Random(f"xmerge-mathgen/{split}/{seed}")
    seen: set[str] = set()
    misses = 0
    while misses < 100_000:
        question, steps, answer = rng.choice(TEMPLATES)(rng)
        if question in seen or split_of(question) != split:
            misses += 1
            continue
        misses = 0
        seen.add(question)
        yield MathProblem(question, ". ".join(steps) + f". The answer is {answer}.", answer)
    raise XmergeError(f"math generator exhausted after {len(seen)} distinct {split} problems")


def math_problems(n: int, split: Split, seed: int = 0) -> list[MathProblem]:
    """The first `n` problems of `split` for `seed` (same arguments, same list)."""
    if n < 0:
        raise XmergeError(f"number of math problems must be >= 0, got {n}")
    return list(itertools.islice(iter_math_problems(split, seed), n))
