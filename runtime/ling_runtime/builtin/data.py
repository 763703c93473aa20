"""The built-in model's task: short facts and arithmetic as single-turn chats, generated here.

Every question is one relation (capital of a country, the country of a capital, the continent of a
country, a sum, a difference, a product, or a few fixed chit-chat turns) asked through one of
several phrasings; the answer is one fixed sentence per relation ("The capital of France is
Paris."), so the answer repeats words of the question and the MTP layer can draft it.

The held-out set is (fact, phrasing) pairs that never appear in training: each held-out fact is
trained under its other phrasings and each phrasing under other facts, so answering one means
recombining both, not recalling the question. The card's question ("What is the capital of
France?") is always in training: it is the product's first answer.

Everything is a pure function of ``DATA_SEED`` and the tables below (``random.Random``, sorted
iteration), so the data and its hash are the same on every machine.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from functools import cache

DATA_SEED = 20261129
HOLDOUT_FRACTION = 0.12
CARD_QUESTION = "What is the capital of France?"
CARD_ANSWER = "The capital of France is Paris."

# (country, capital, continent)
COUNTRIES: tuple[tuple[str, str, str], ...] = (
    ("France", "Paris", "Europe"),
    ("Germany", "Berlin", "Europe"),
    ("Italy", "Rome", "Europe"),
    ("Spain", "Madrid", "Europe"),
    ("Portugal", "Lisbon", "Europe"),
    ("Greece", "Athens", "Europe"),
    ("Poland", "Warsaw", "Europe"),
    ("Austria", "Vienna", "Europe"),
    ("Sweden", "Stockholm", "Europe"),
    ("Norway", "Oslo", "Europe"),
    ("Finland", "Helsinki", "Europe"),
    ("Denmark", "Copenhagen", "Europe"),
    ("Ireland", "Dublin", "Europe"),
    ("Belgium", "Brussels", "Europe"),
    ("Hungary", "Budapest", "Europe"),
    ("Switzerland", "Bern", "Europe"),
    ("Romania", "Bucharest", "Europe"),
    ("Ukraine", "Kyiv", "Europe"),
    ("Russia", "Moscow", "Europe"),
    ("Japan", "Tokyo", "Asia"),
    ("China", "Beijing", "Asia"),
    ("India", "New Delhi", "Asia"),
    ("Thailand", "Bangkok", "Asia"),
    ("Vietnam", "Hanoi", "Asia"),
    ("Indonesia", "Jakarta", "Asia"),
    ("Iran", "Tehran", "Asia"),
    ("Iraq", "Baghdad", "Asia"),
    ("Pakistan", "Islamabad", "Asia"),
    ("South Korea", "Seoul", "Asia"),
    ("Philippines", "Manila", "Asia"),
    ("Egypt", "Cairo", "Africa"),
    ("Kenya", "Nairobi", "Africa"),
    ("Nigeria", "Abuja", "Africa"),
    ("Ghana", "Accra", "Africa"),
    ("Morocco", "Rabat", "Africa"),
    ("Ethiopia", "Addis Ababa", "Africa"),
    ("Canada", "Ottawa", "North America"),
    ("Mexico", "Mexico City", "North America"),
    ("Cuba", "Havana", "North America"),
    ("Brazil", "Brasilia", "South America"),
    ("Argentina", "Buenos Aires", "South America"),
    ("Peru", "Lima", "South America"),
    ("Chile", "Santiago", "South America"),
    ("Colombia", "Bogota", "South America"),
    ("Venezuela", "Caracas", "South America"),
    ("Australia", "Canberra", "Oceania"),
    ("New Zealand", "Wellington", "Oceania"),
)

# relation -> (question phrasings, answer sentence); fields are str.format names.
RELATIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "capital": (
        (
            "What is the capital of {country}?",
            "Which city is the capital of {country}?",
            "Name the capital of {country}.",
            "Tell me the capital of {country}.",
            "What city is the capital of {country}?",
        ),
        "The capital of {country} is {capital}.",
    ),
    "country_of": (
        (
            # The capital never opens a question: a word's first-in-line token ("Paris", no leading
            # space) is another token than " Paris", and no phrasing may hinge on one seen only here.
            "The city of {capital} is the capital of which country?",
            "Which country has {capital} as its capital?",
            "Of which country is {capital} the capital?",
            "Where is {capital} the capital?",
        ),
        "{capital} is the capital of {country}.",
    ),
    "continent": (
        (
            "Which continent is {country} in?",
            "On which continent is {country}?",
            "Where is {country}?",
            "Name the continent of {country}.",
        ),
        "{country} is in {continent}.",
    ),
    "plus": (
        (
            "What is {a} plus {b}?",
            "How much is {a} plus {b}?",
            "Compute {a} plus {b}.",
            "What do you get if you add {a} and {b}?",
            "Add {a} and {b}.",
        ),
        "{a} plus {b} is {result}.",
    ),
    "minus": (
        (
            "What is {a} minus {b}?",
            "How much is {a} minus {b}?",
            "Compute {a} minus {b}.",
            "Subtract {b} from {a}.",
        ),
        "{a} minus {b} is {result}.",
    ),
    "times": (
        (
            "What is {a} times {b}?",
            "How much is {a} times {b}?",
            "Compute {a} times {b}.",
            "Multiply {a} by {b}.",
        ),
        "{a} times {b} is {result}.",
    ),
}

# Fixed turns, trained under every phrasing (nothing of them is held out).
CHITCHAT: tuple[tuple[tuple[str, ...], str], ...] = (
    (
        ("hi", "Hi", "Hello", "hello", "Hello!", "Hi there", "Hey"),
        "Hello! I am the built-in Ling model. Ask me about capitals or arithmetic.",
    ),
    (
        ("Who are you?", "What are you?", "What is your name?"),
        "I am the built-in Ling model, a tiny Ling-2.6 trained on capitals and arithmetic.",
    ),
    (("Name three colours.", "Name three colors."), "Red, green and blue."),
    (("Say hello to the cluster.",), "Hello, cluster! The group is serving."),
)

MAX_OPERAND = 12  # plus and minus over 0..12; times over 1..10
MAX_FACTOR = 10


@dataclass(frozen=True)
class Example:
    """One chat turn: the user's question and the assistant's answer."""

    relation: str
    fact: str  # what is asked, independent of the phrasing ("capital:France", "plus:3:4")
    phrasing: int
    question: str
    answer: str


def _facts() -> list[tuple[str, str, dict[str, str]]]:
    """(relation, fact id, format fields) for every fact, in a fixed order."""
    out: list[tuple[str, str, dict[str, str]]] = []
    for country, capital, continent in COUNTRIES:
        fields = {"country": country, "capital": capital, "continent": continent}
        out.append(("capital", f"capital:{country}", fields))
        out.append(("country_of", f"country_of:{capital}", fields))
        out.append(("continent", f"continent:{country}", fields))
    for a in range(MAX_OPERAND + 1):
        for b in range(MAX_OPERAND + 1):
            out.append(("plus", f"plus:{a}:{b}", {"a": str(a), "b": str(b), "result": str(a + b)}))
            if a >= b:
                out.append(("minus", f"minus:{a}:{b}", {"a": str(a), "b": str(b), "result": str(a - b)}))
    for a in range(1, MAX_FACTOR + 1):
        for b in range(1, MAX_FACTOR + 1):
            out.append(("times", f"times:{a}:{b}", {"a": str(a), "b": str(b), "result": str(a * b)}))
    return out


@dataclass(frozen=True)
class TaskData:
    train: tuple[Example, ...]
    held_out: tuple[Example, ...]

    def digest(self) -> str:
        """sha256 of every example (part of the built-in model's cache key)."""
        rows = [[e.relation, e.fact, e.phrasing, e.question, e.answer] for e in self.train + self.held_out]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


@cache
def task_data() -> TaskData:
    """The training examples and the held-out ones (see the module docstring)."""
    rng = random.Random(DATA_SEED)
    train: list[Example] = []
    held: list[Example] = []
    for relation, fact, fields in _facts():
        phrasings, answer = RELATIONS[relation]
        examples = [
            Example(relation, fact, i, q.format(**fields), answer.format(**fields))
            for i, q in enumerate(phrasings)
        ]
        # Hold out one phrasing of some facts; the others keep the fact in training.
        hold = rng.random() < HOLDOUT_FRACTION * len(phrasings)
        pick = rng.randrange(len(phrasings))
        for e in examples:
            if hold and e.phrasing == pick and e.question != CARD_QUESTION:
                held.append(e)
            else:
                train.append(e)
    for n, (questions, answer) in enumerate(CHITCHAT):
        for i, q in enumerate(questions):
            train.append(Example("chitchat", f"chitchat:{n}", i, q, answer))
    return TaskData(tuple(train), tuple(held))


def held_out_sample(n: int, seed: int = 0) -> list[Example]:
    """``n`` held-out examples spread over the relations (a fixed sample, for tests that must be quick)."""
    held = task_data().held_out
    by_relation: dict[str, list[Example]] = {}
    for e in held:
        by_relation.setdefault(e.relation, []).append(e)
    rng = random.Random(seed)
    pools = [rng.sample(v, len(v)) for _, v in sorted(by_relation.items())]
    out: list[Example] = []
    while len(out) < min(n, len(held)):
        for pool in pools:
            if pool and len(out) < n:
                out.append(pool.pop())
    return out
