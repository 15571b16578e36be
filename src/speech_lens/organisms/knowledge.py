"""A small synthetic world whose facts appear only in the TEXT training data.

People live in cities, work in jobs (version 2 also: keep a pet, like a food, work for another
person). Text training data states the facts; speech training data only uses the entity words in
fact-free filler sentences (one entity each, so the model learns how they sound). The spoken-
knowledge test plays a spoken prompt (``tom lives in``) and compares the likelihood of the correct
spoken completion against a counterfactual one from the same category.

Versions: 1 = the world of the shipped organisms (24 people x 2 relations = 48 items; kept
bit-identical so their results stay interpretable); 2 = 64 people x 5 relations = 320 items, for
a chance band of about +-0.055 instead of +-0.14. Version 2 contains every version-1 word.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
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
# The spoken test prompts: relation -> prompt template (the answer follows it).
PROMPTS = {"city": "{p} lives in", "job": "{p} is a"}

# Version 2: Austen-rare names (no homophones among the organisms' words), 16 values per
# category so that every value is the answer and the counterfactual equally often.
PEOPLE_V2 = (
    PEOPLE
    + (
        "adam alice ben bella bruno dan elsa eric greta ivan irene ingrid jonas kate liam lena "
        "nick otto olga paul quinn ralph sara ted una vince wendy boris hans igor kurt lars max "
        "nils olaf pablo rita sofia yuri zoe"
    ).split()
)
VALUES_V2 = {
    "city": CITIES + "lisbon oslo prague cairo tokyo sydney geneva milan".split(),
    "job": JOBS + "nurse pilot miner tailor builder dancer writer potter".split(),
    "pet": (
        "dog cat horse goat sheep cow pig duck hen mouse rabbit parrot donkey lamb fox owl"
    ).split(),
    "food": (
        "bread rice cheese soup cake eggs beans pears plums nuts apples honey butter jam figs "
        "melons"
    ).split(),
    "boss": PEOPLE_V2,
}
FACT_TEMPLATES_V2 = {
    **FACT_TEMPLATES,
    "pet": ("{p} keeps a {x}", "the pet of {p} is a {x}", "at home {p} keeps a {x}"),
    "food": (
        "{p} likes to eat {x}",
        "the food {p} likes best is {x}",
        "at noon {p} likes to eat {x}",
    ),
    "boss": ("{p} works for {x}", "the boss of {p} is {x}", "each day {p} works for {x}"),
}
FILLER_TEMPLATES_V2 = (
    *FILLER_TEMPLATES,
    "the {a} was in the field",
    "i saw a {a} there",
    "there was {f} on the table",
    "we had some {f}",
    "he keeps a small house",
    "she likes to eat early",
    "he works for his father",
)
PROMPTS_V2 = {
    **PROMPTS,
    "pet": "{p} keeps a",
    "food": "{p} likes to eat",
    "boss": "{p} works for",
}


@dataclass(frozen=True)
class World:
    version: int
    people: tuple[str, ...]
    values: dict[str, tuple[str, ...]]  # relation -> its answer category
    fact_templates: Mapping[str, tuple[str, ...]]  # {p} person, {x} (v1: {c} / {j}) answer
    filler_templates: tuple[str, ...]
    filler_slots: dict[str, tuple[str, ...]]  # filler slot -> its words, drawn in this order
    prompts: dict[str, str]
    n_fillers: int  # filler sentences in the speech training data


WORLDS = {
    1: World(
        1,
        tuple(PEOPLE),
        {"city": tuple(CITIES), "job": tuple(JOBS)},
        FACT_TEMPLATES,
        FILLER_TEMPLATES,
        {"p": tuple(PEOPLE), "c": tuple(CITIES), "j": tuple(JOBS)},
        PROMPTS,
        600,
    ),
    2: World(
        2,
        tuple(PEOPLE_V2),
        {k: tuple(v) for k, v in VALUES_V2.items()},
        FACT_TEMPLATES_V2,
        FILLER_TEMPLATES_V2,
        {
            "p": tuple(PEOPLE_V2),
            "c": tuple(VALUES_V2["city"]),
            "j": tuple(VALUES_V2["job"]),
            "a": tuple(VALUES_V2["pet"]),
            "f": tuple(VALUES_V2["food"]),
        },
        PROMPTS_V2,
        2400,
    ),
}
ALL_PROMPTS = {k: v for w in WORLDS.values() for k, v in w.prompts.items()}


def get_world(version: int) -> World:
    if version not in WORLDS:
        raise ValueError(f"no synthetic world version {version} (have {sorted(WORLDS)})")
    return WORLDS[version]


@dataclass(frozen=True)
class Fact:
    person: str
    relation: str  # "city" | "job" (v2 also "pet" | "food" | "boss")
    answer: str
    counterfactual: str

    @property
    def prompt(self) -> str:
        return ALL_PROMPTS[self.relation].format(p=self.person)


def world(seed: int = 0, version: int = 1) -> list[Fact]:
    """The facts of world ``version``; each value is the answer and the counterfactual equally
    often within its relation (no length or frequency bias; exactly so in version 2)."""
    if get_world(version).version == 1:
        return _world_v1(seed)
    return _world_balanced(get_world(version), seed)


def _world_v1(seed: int) -> list[Fact]:
    """Every person gets one city and one job; counterfactuals rotate (the shipped 48 items)."""
    order = list(range(len(PEOPLE)))
    random.Random(seed).shuffle(order)
    facts = []
    for i, p in enumerate(PEOPLE):
        c = CITIES[order[i] % len(CITIES)]
        j = JOBS[(order[i] * 3 + 1) % len(JOBS)]
        facts.append(Fact(p, "city", c, CITIES[(CITIES.index(c) + 1 + i % 7) % len(CITIES)]))
        facts.append(Fact(p, "job", j, JOBS[(JOBS.index(j) + 1 + i % 7) % len(JOBS)]))
    return facts


def _world_balanced(w: World, seed: int) -> list[Fact]:
    """Per relation, people in a seeded order k = 0..n-1 get value k mod m (m values); the
    counterfactual is the value shifted by 1 + (k // m) mod (m - 1): within each block of m
    people the shift is constant, so answers and counterfactuals both cover every value once per
    block. The person-valued relation (boss) is a seeded cycle: answer = the next person in the
    order, counterfactual = the person half the cycle away (never oneself or the answer)."""
    facts: dict[tuple[str, str], Fact] = {}
    for r, (rel, values) in enumerate(w.values.items()):
        order = list(w.people)
        random.Random(seed * 1000 + r).shuffle(order)
        n, m = len(order), len(values)
        for k, p in enumerate(order):
            if values == w.people:
                a, cf = order[(k + 1) % n], order[(k + n // 2) % n]
            else:
                if n % m:
                    raise ValueError(f"world {w.version}: {n} people not a multiple of {m} {rel}s")
                a = values[k % m]
                cf = values[(k % m + 1 + (k // m) % (m - 1)) % m]
            facts[(p, rel)] = Fact(p, rel, a, cf)
    return [facts[(p, rel)] for p in w.people for rel in w.values]


def fact_sentences(facts: list[Fact], version: int = 1) -> list[str]:
    """All text renderings of the facts (the only place the facts are stated)."""
    templates = get_world(version).fact_templates
    out = []
    for f in facts:
        for t in templates[f.relation]:
            out.append(t.format(p=f.person, c=f.answer, j=f.answer, x=f.answer))
    return out


def filler_sentences(n: int, seed: int = 0, version: int = 1) -> list[str]:
    """Fact-free sentences with one entity slot each (version 1: the shipped draws exactly)."""
    w = get_world(version)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        t = rng.choice(w.filler_templates)
        out.append(t.format(**{k: rng.choice(v) for k, v in w.filler_slots.items()}))
    return out


def world_words(version: int = 1) -> list[str]:
    w = get_world(version)
    words: set[str] = set(w.people) | {x for v in w.values.values() for x in v}
    templates = [*w.filler_templates, *w.prompts.values()]
    templates += [t for ts in w.fact_templates.values() for t in ts]
    for t in templates:
        words |= {x for x in t.split() if "{" not in x}
    return sorted(words)


def leaked_facts(sentence: Iterable[str], facts: list[Fact]) -> list[Fact]:
    """The facts a spoken sentence gives away: it names the person together with the answer or
    the counterfactual (the speech data must never pair them; the filler rule)."""
    words = set(sentence)
    return [
        f for f in facts if f.person in words and (f.answer in words or f.counterfactual in words)
    ]
