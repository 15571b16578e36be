"""A small synthetic world whose facts appear only in the TEXT training data.

People live in cities and work in jobs. Text training data states the facts; speech training data
only uses the entity words in fact-free filler sentences (so the model learns how they sound).
The spoken-knowledge test plays a spoken prompt (``tom lives in``) and compares the likelihood of
the correct spoken completion against a counterfactual one from the same category.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PEOPLE = (
    "tom anna peter lucy jack rosa david nora oscar ella felix julia "
    "victor clara hugo ida leon maya owen ruth simon tess walter vera"
).split()
CITIES = "paris london rome berlin madrid vienna dublin boston".split()
JOBS = "baker doctor farmer teacher sailor painter lawyer singer".split()

FACT_TEMPLATES = {
    "city": ("{p} lives in {c}", "{p} has a house in {c}", "the home of {p} is in {c}"),
    "job": ("{p} is a {j}", "{p} works as a {j}", "by trade {p} is a {j}"),
}
# Fact-free sentences that make every entity word (and the prompt words) heard in speech.
FILLER_TEMPLATES = (
    "i saw {p} today",
    "{p} said it was very good",
    "we spoke of {p}",
    "we went to {c}",
    "it was far from {c}",
    "the {j} came to the door",
    "she was a good {j}",
    "he lives in a small house",
    "she lives in the country",
    "he is a good man",
    "it is a fine day",
)
# The spoken test prompts: relation -> (prompt template, answer slot).
PROMPTS = {"city": "{p} lives in", "job": "{p} is a"}


@dataclass(frozen=True)
class Fact:
    person: str
    relation: str  # "city" | "job"
    answer: str
    counterfactual: str

    @property
    def prompt(self) -> str:
        return PROMPTS[self.relation].format(p=self.person)


def world(seed: int = 0) -> list[Fact]:
    """Every person gets one city and one job; counterfactuals rotate so that each value is the
    correct answer and the counterfactual equally often (no length or frequency bias)."""
    order = list(range(len(PEOPLE)))
    random.Random(seed).shuffle(order)
    facts = []
    for i, p in enumerate(PEOPLE):
        c = CITIES[order[i] % len(CITIES)]
        j = JOBS[(order[i] * 3 + 1) % len(JOBS)]
        facts.append(Fact(p, "city", c, CITIES[(CITIES.index(c) + 1 + i % 7) % len(CITIES)]))
        facts.append(Fact(p, "job", j, JOBS[(JOBS.index(j) + 1 + i % 7) % len(JOBS)]))
    return facts


def fact_sentences(facts: list[Fact]) -> list[str]:
    """All text renderings of the facts (the only place the facts are stated)."""
    out = []
    for f in facts:
        for t in FACT_TEMPLATES[f.relation]:
            out.append(t.format(p=f.person, c=f.answer, j=f.answer))
    return out


def filler_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        t = rng.choice(FILLER_TEMPLATES)
        out.append(t.format(p=rng.choice(PEOPLE), c=rng.choice(CITIES), j=rng.choice(JOBS)))
    return out


def world_words() -> list[str]:
    words: set[str] = set(PEOPLE) | set(CITIES) | set(JOBS)
    for t in (*FILLER_TEMPLATES, *PROMPTS.values()):
        words |= {w for w in t.split() if "{" not in w}
    for ts in FACT_TEMPLATES.values():
        for t in ts:
            words |= {w for w in t.split() if "{" not in w}
    return sorted(words)
