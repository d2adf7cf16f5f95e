"""Print the run folder (`train.output_dir`) that a recipe plus dotted overrides resolve to.

    python launch/slurm/output_dir.py configs/RECIPE.yaml [section.key=value ...]

train.sbatch needs it to find OUTPUT/COMPLETED. Only `train.output_dir` is resolved (same
precedence as the trainer: CLI > recipe > default), so SFT and DPO recipes, whose extra
sections this tool does not know, work too; full validation is the trainer's job.
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

from trainer.config import TrainSection, parse_override


def resolve_output_dir(recipe: str | Path, overrides: list[str]) -> str:
    path = Path(recipe)
    if not path.is_file():
        raise SystemExit(f"error: {path}: recipe not found")
    tree = yaml.safe_load(path.read_text()) or {}
    train = tree.get("train") if isinstance(tree, dict) else None
    value = TrainSection.model_fields["output_dir"].default
    if isinstance(train, dict) and train.get("output_dir") is not None:
        value = train["output_dir"]
    for text in overrides:
        # Anything that is not a dotted override (a --flag for the entry point) is not ours to judge.
        if text.startswith("-") or "=" not in text:
            continue
        parts, parsed = parse_override(text)
        if parts == ["train", "output_dir"]:
            value = parsed
    return str(value)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    print(resolve_output_dir(argv[0], argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
