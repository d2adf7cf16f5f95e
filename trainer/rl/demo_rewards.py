"""Verifiable rewards for the demo world's arithmetic questions ("What is 7 + 12?", "Add 7 and 12.")."""
from __future__ import annotations

import re

_QUESTION = re.compile(r"(?:What is (\d+) \+ (\d+)\?|Add (\d+) and (\d+)\.)")
_STATED = re.compile(r"=\s*(-?\d+)")


def expected_sum(prompt: str) -> int | None:
    m = _QUESTION.search(prompt)
    if m is None:
        return None
    x, y = (int(g) for g in m.groups() if g is not None)
    return x + y


def arithmetic_exact(prompts: list[str], completions: list[str], **_) -> list[float]:
    """1 when the completion states the sum asked for ("x + y = z", its first "= z"), else 0. What
    follows the statement does not count: the reward is about the sum, not about stopping."""
    rewards = []
    for prompt, completion in zip(prompts, completions):
        want = expected_sum(prompt)
        if want is None:
            raise ValueError(f"not an arithmetic question: {prompt!r}")
        stated = _STATED.search(completion)
        rewards.append(1.0 if stated and int(stated.group(1)) == want else 0.0)
    return rewards


def arithmetic_format(prompts: list[str], completions: list[str], **_) -> list[float]:
    """1 when the completion has the demo's answer shape `x + y = z.` (a small shaping reward)."""
    return [1.0 if re.fullmatch(r"\s*\d+ \+ \d+ = -?\d+\.\s*", c) else 0.0 for c in completions]


def arithmetic_prompts(rows: list[dict]) -> list[dict]:
    """The arithmetic questions among demo preference rows, as RL prompt rows with their answer."""
    out = []
    for row in rows:
        want = expected_sum(row["prompt"]) if isinstance(row.get("prompt"), str) else None
        if want is not None:
            out.append({"prompt": row["prompt"], "answer": str(want)})
    return out


def main(argv: list[str] | None = None) -> int:
    """python -m trainer.rl.demo_rewards DPO_JSONL OUT_JSONL: the RL demo's prompt file."""
    import argparse
    import json
    import os
    from pathlib import Path

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("source")
    parser.add_argument("out")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_JSONL")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        parser.error(f"{out} exists (pass --overwrite to replace it)")
    rows = [json.loads(line) for line in Path(args.source).read_text().splitlines() if line.strip()]
    prompts = arithmetic_prompts(rows)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in prompts))
    os.replace(tmp, out)  # never a half-written prompt file
    print(f"{len(prompts)} arithmetic prompts -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
