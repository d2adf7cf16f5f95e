"""A synthetic, seeded demo corpus: a small made-up world the project can pretrain, SFT and DPO on offline.

The world is a set of invented people (name, city, age, job, favourite colour, pet) in
invented cities. From it come:

- pretraining documents: fact sheets, city descriptions, short template stories that
  stay true to the facts, arithmetic drills and counting sequences;
- SFT rows (`{"messages": [user, assistant]}`) asking about the facts, sums and counts,
  with the correct answers;
- DPO rows (`{"prompt", "chosen", "rejected"}`): the correct answer against a wrong one
  in the same words (another person's city, a sum off by a little, a skipped number).

Everything is a pure function of the seed. The structure is regular enough that a tiny
model on a laptop CPU shows a clearly falling loss within minutes.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from trainer.data.staging import staged_folder

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "tr", "sh", "th"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ei"]
_CODAS = ["", "", "n", "r", "l", "s", "m", "x"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "brown"]
PETS = ["cat", "dog", "parrot", "rabbit", "turtle", "goat", "hamster", "owl"]
JOBS = ["baker", "teacher", "farmer", "painter", "doctor", "sailor", "builder", "singer", "tailor", "miner"]
FOODS = ["bread", "apples", "cheese", "fish", "rice", "soup", "honey", "plums"]
LANDMARKS = ["a river", "a tall hill", "an old bridge", "a quiet lake", "a busy market", "a stone tower"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    age: int
    job: str
    color: str
    pet: str


@dataclass(frozen=True)
class World:
    people: tuple[Person, ...]
    cities: dict[str, str]  # city -> landmark

    def residents(self, city: str) -> list[str]:
        return [p.name for p in self.people if p.city == city]


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).capitalize()


def _unique_words(rng: random.Random, n: int, syllables: tuple[int, int]) -> list[str]:
    words: list[str] = []
    while len(words) < n:
        w = _word(rng, rng.randint(*syllables))
        if w not in words and 3 <= len(w) <= 12:
            words.append(w)
    return words


def make_world(seed: int = 0, n_people: int = 48, n_cities: int = 8) -> World:
    rng = random.Random(f"world-{seed}")
    cities = _unique_words(rng, n_cities, (2, 3))
    names = _unique_words(rng, n_people, (2, 2))
    people = tuple(
        Person(name=n, city=rng.choice(cities), age=rng.randint(18, 80), job=rng.choice(JOBS),
               color=rng.choice(COLORS), pet=rng.choice(PETS))
        for n in names
    )
    return World(people=people, cities={c: rng.choice(LANDMARKS) for c in cities})


# --- facts in words -------------------------------------------------------------------------------------------

def _fact(p: Person, attr: str, rng: random.Random) -> str:
    options = {
        "city": [f"{p.name} lives in {p.city}.", f"{p.name}'s home is in {p.city}."],
        "age": [f"{p.name} is {p.age} years old.", f"{p.name} is {p.age}."],
        "job": [f"{p.name} works as {_a(p.job)}.", f"{p.name} is {_a(p.job)}."],
        "color": [f"{p.name}'s favorite color is {p.color}.", f"{p.name} likes the color {p.color} best."],
        "pet": [f"{p.name} has {_a(p.pet)}.", f"{p.name} keeps {_a(p.pet)} at home."],
    }[attr]
    return rng.choice(options)


ATTRIBUTES = ("city", "age", "job", "color", "pet")


def _fact_sheet(world: World, rng: random.Random) -> str:
    p = rng.choice(world.people)
    attrs = list(ATTRIBUTES)
    rng.shuffle(attrs)
    return " ".join(_fact(p, a, rng) for a in attrs[:rng.randint(3, 5)])


def _city_text(world: World, rng: random.Random) -> str:
    city = rng.choice(list(world.cities))
    people = world.residents(city)
    who = ", ".join(people[:-1]) + f" and {people[-1]}" if len(people) > 1 else (people[0] if people else "nobody")
    return f"{city} is a town near {world.cities[city]}. The people who live in {city} are {who}."


def _story(world: World, rng: random.Random) -> str:
    a, b = rng.sample(world.people, 2)
    food = rng.choice(FOODS)
    return (
        f"One morning {a.name} left {a.city} to buy {food}. On the road, {a.name} met {b.name}, "
        f"{_a(b.job)} from {b.city}. {b.name} was walking {_a(b.pet)}. They talked about colors: "
        f"{a.name} said that {a.color} is the best color, and {b.name} said that {b.color} is better. "
        f"In the evening {a.name} went back home to {a.city} with the {food}."
    )


def _arithmetic(_: World, rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(4, 8)):
        op = rng.choice("+-*")
        if op == "+":
            x, y = rng.randint(0, 50), rng.randint(0, 50)
            lines.append(f"{x} + {y} = {x + y}.")
        elif op == "-":
            x = rng.randint(0, 60)
            y = rng.randint(0, x)
            lines.append(f"{x} - {y} = {x - y}.")
        else:
            x, y = rng.randint(0, 10), rng.randint(0, 10)
            lines.append(f"{x} times {y} is {x * y}.")
    return "\n".join(lines)


def _counting(_: World, rng: random.Random) -> str:
    start = rng.randint(0, 40)
    stop = start + rng.randint(4, 12)
    if rng.random() < 0.25:
        return f"Counting down from {stop} to {start}: " + ", ".join(str(i) for i in range(stop, start - 1, -1)) + "."
    if rng.random() < 0.2:
        return "Counting in words: " + ", ".join(NUMBER_WORDS[: rng.randint(4, 11)]) + "."
    return f"Counting from {start} to {stop}: " + ", ".join(str(i) for i in range(start, stop + 1)) + "."


def pretrain_documents(world: World, n_docs: int, rng: random.Random) -> list[str]:
    kinds = [(_fact_sheet, 0.35), (_city_text, 0.1), (_story, 0.2), (_arithmetic, 0.2), (_counting, 0.15)]
    docs = []
    for _ in range(n_docs):
        make = rng.choices([k for k, _ in kinds], weights=[w for _, w in kinds])[0]
        docs.append(make(world, rng))
    return docs


# --- questions, right and wrong answers ----------------------------------------------------------------------

def _fact_questions(p: Person, attr: str) -> list[str]:
    return {
        "city": [f"Where does {p.name} live?", f"In which town does {p.name} live?"],
        "age": [f"How old is {p.name}?", f"What is the age of {p.name}?"],
        "job": [f"What does {p.name} do for a living?", f"What is {p.name}'s job?"],
        "color": [f"What is {p.name}'s favorite color?", f"Which color does {p.name} like best?"],
        "pet": [f"What pet does {p.name} have?", f"Which animal does {p.name} keep at home?"],
    }[attr]


def _fact_answer(p: Person, attr: str, value: object) -> str:
    return {
        "city": f"{p.name} lives in {value}.",
        "age": f"{p.name} is {value} years old.",
        "job": f"{p.name} works as {_a(str(value))}.",
        "color": f"{p.name}'s favorite color is {value}.",
        "pet": f"{p.name} has {_a(str(value))}.",
    }[attr]


def _wrong_value(world: World, p: Person, attr: str, rng: random.Random) -> object:
    true = getattr(p, attr)
    if attr == "age":
        return true + rng.choice([-7, -3, -1, 1, 2, 5])
    pool = {"city": list(world.cities), "job": JOBS, "color": COLORS, "pet": PETS}[attr]
    return rng.choice([v for v in pool if v != true])


def _qa_groups(world: World, rng: random.Random) -> list[list[dict]]:
    """Every question the demo asks, with its correct and one wrong answer, grouped by the fact asked about
    (the phrasings of one fact stay in the same split)."""
    groups = []
    for p in world.people:
        for attr in ATTRIBUTES:
            right = _fact_answer(p, attr, getattr(p, attr))
            groups.append([{"prompt": q, "chosen": right,
                            "rejected": _fact_answer(p, attr, _wrong_value(world, p, attr, rng)),
                            "person": p, "attr": attr}
                           for q in _fact_questions(p, attr)])
    for x in range(0, 21):
        for y in range(0, 21, 2):
            groups.append([{"prompt": q, "chosen": f"{x} + {y} = {x + y}.",
                            "rejected": f"{x} + {y} = {x + y + rng.choice([-2, -1, 1, 2, 10])}.", "sum": (x, y)}
                           for q in (f"What is {x} + {y}?", f"Add {x} and {y}.")])
    for start in range(0, 30, 2):
        stop = start + rng.randint(3, 8)
        seq = list(range(start, stop + 1))
        broken = seq[:]
        del broken[rng.randrange(1, len(broken) - 1)]
        groups.append([{"prompt": f"Count from {start} to {stop}.", "chosen": ", ".join(map(str, seq)) + ".",
                        "rejected": ", ".join(map(str, broken)) + "."}])
    return groups


def _reward_pairs(world: World, items: list[dict], rng: random.Random) -> list[dict]:
    """Three pairs per question for the reward model: the DPO pair (a wrong value), an answer about
    something else (another person's name, other operands: a true statement that does not answer the
    question) and the right answer running on into an unrelated sentence. The last two are what the
    SFT model gets wrong and a small model can check against the question; a wrong value mostly is not
    (judging it takes knowing the fact or doing the sum), so those pairs alone leave a reward model at chance."""
    pairs = []
    for item in items:
        pairs.append(_as_dpo(item))
        other = rng.choice([p for p in world.people if p is not item.get("person")])
        if "person" in item:
            p, attr = item["person"], item["attr"]
            off_topic = _fact_answer(other, attr, getattr(p, attr))
        elif "sum" in item:
            x, y = item["sum"]
            x2 = rng.choice([v for v in range(21) if v != x])
            off_topic = f"{x2} + {y} = {x2 + y}."
        else:  # counting: the same run shifted
            seq = [int(n) for n in item["chosen"].rstrip(".").split(", ")]
            shift = rng.choice([1, 2, 3])
            off_topic = ", ".join(str(n + shift) for n in seq) + "."
        pairs.append({"prompt": item["prompt"], "chosen": item["chosen"], "rejected": off_topic})
        attr = rng.choice(ATTRIBUTES)
        run_on = _fact_answer(other, attr, getattr(other, attr))
        pairs.append({"prompt": item["prompt"], "chosen": item["chosen"], "rejected": f"{item['chosen']} {run_on}"})
    rng.shuffle(pairs)
    return pairs


def _as_sft(item: dict) -> dict:
    return {"messages": [{"role": "user", "content": item["prompt"]},
                         {"role": "assistant", "content": item["chosen"]}]}


def _as_dpo(item: dict) -> dict:
    return {"prompt": item["prompt"], "chosen": item["chosen"], "rejected": item["rejected"]}


def build_demo_data(seed: int = 0, n_pretrain_docs: int = 8000, n_people: int = 48,
                    eval_fraction: float = 0.1) -> dict[str, list[dict]]:
    """All demo files as rows: {'pretrain', 'pretrain_eval', 'sft', 'sft_eval', 'dpo', 'dpo_eval'}.

    The eval splits hold out whole facts (every phrasing of a question); the facts themselves
    are stated in the pretraining text, so a pretrained model can know them.
    """
    world = make_world(seed, n_people=n_people)
    n_eval_docs = max(1, int(n_pretrain_docs * eval_fraction))
    pretrain = pretrain_documents(world, n_pretrain_docs, random.Random(f"pretrain-{seed}"))
    pretrain_eval = pretrain_documents(world, n_eval_docs, random.Random(f"pretrain-eval-{seed}"))
    rng = random.Random(f"qa-{seed}")
    groups = _qa_groups(world, rng)
    rng.shuffle(groups)
    n_eval = max(1, int(len(groups) * eval_fraction))
    held = [item for group in groups[:n_eval] for item in group]
    kept = [item for group in groups[n_eval:] for item in group]
    rng.shuffle(kept)
    return {
        "pretrain": [{"text": t} for t in pretrain],
        "pretrain_eval": [{"text": t} for t in pretrain_eval],
        "sft": [_as_sft(i) for i in kept],
        "sft_eval": [_as_sft(i) for i in held],
        "dpo": [_as_dpo(i) for i in kept],
        "dpo_eval": [_as_dpo(i) for i in held],
        # Drawn after everything above from their own generator: the other files do not change.
        "reward": _reward_pairs(world, kept, random.Random(f"reward-{seed}")),
        "reward_eval": _reward_pairs(world, held, random.Random(f"reward-eval-{seed}")),
        "world": [asdict(p) for p in world.people],
    }


def write_demo_data(out_dir: str | Path, seed: int = 0, n_pretrain_docs: int = 8000, n_people: int = 48,
                    overwrite: bool = False) -> dict[str, int]:
    """Write `<name>.jsonl` for every split of `build_demo_data` into out_dir; returns rows per file."""
    data = build_demo_data(seed, n_pretrain_docs=n_pretrain_docs, n_people=n_people)
    counts = {}
    with staged_folder(out_dir, overwrite) as tmp:
        for name, rows in data.items():
            with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            counts[f"{name}.jsonl"] = len(rows)
    return counts
