"""The demo world's offline lm-eval tasks (eval/tasks/demo/): facts as raw-text multiple choice and sums as
short generation, both from `trainer.data.demo_corpus`'s seed-0 world, the one launch/demo.sh trains on.

Raw text, not chat: the pretrained model never saw a chat prompt, and every later stage must keep the facts.

    python -m eval.demo_tasks            # rewrite the JSONL files beside the task YAMLs
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from trainer.data.demo_corpus import COLORS, make_world

DEMO_TASKS_DIR = Path(__file__).parent / "tasks" / "demo"


def demo_task_rows(seed: int = 0) -> dict[str, list[dict]]:
    world = make_world(seed)
    cities = sorted(world.cities)
    mc = []
    for person in world.people:
        mc.append({"context": f"{person.name} lives in", "choices": cities, "answer": cities.index(person.city)})
        mc.append({"context": f"{person.name}'s favorite color is", "choices": COLORS,
                   "answer": COLORS.index(person.color)})
    rng = random.Random(f"demo-sums-{seed}")
    sums = []
    for _ in range(40):
        x, y = rng.randint(0, 50), rng.randint(0, 50)
        sums.append({"question": f"{x} + {y} =", "answer": str(x + y)})
    return {"demo_facts_mc.jsonl": mc, "demo_sums_gen.jsonl": sums}


def write_demo_tasks(out_dir: Path = DEMO_TASKS_DIR, seed: int = 0) -> None:
    for name, rows in demo_task_rows(seed).items():
        (out_dir / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    write_demo_tasks()
    sys.exit(0)
