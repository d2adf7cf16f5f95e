"""The shared command line of every training entry point (pretrain, sft, dpo)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn

from trainer.checkpoint import AlreadyFinished, check_not_finished
from trainer.config import ConfigError, RunConfig, load_config
from trainer.loop import NonFiniteLossError
from trainer.quiet import set_verbosity


def run_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Overrides are dotted keys, applied after the YAML: train.max_steps=200 optim.lr=1e-3",
    )
    parser.add_argument("--config", help="recipe YAML (configs/*.yaml); defaults apply where it is silent")
    parser.add_argument(
        "--resume", default=None,
        help="'auto': continue from the newest complete checkpoint in train.output_dir (fresh start if none); "
             "or a checkpoint folder",
    )
    parser.add_argument("--verbose", action="store_true",
                        help="show the libraries' warnings and notices (hidden by default)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser


def run_entry_point(doc: str, schema: type[RunConfig], run: Callable[[RunConfig, str | None], object]) -> int:
    """The whole `main` of pretrain.py, sft.py and dpo.py: parse, validate, run, clean errors.

    Options and overrides may come in any order (`--resume auto train.max_steps=10` as well as the
    reverse), hence the intermixed parse.
    """
    def main() -> int:
        args = run_parser(doc.strip().splitlines()[0]).parse_intermixed_args()
        set_verbosity(args.verbose)
        cfg = load_config(args.config, args.overrides, schema=schema)
        check_not_finished(args.resume, cfg.train.output_dir, cfg.train.max_steps)
        run(cfg, args.resume)
        return 0

    return guarded(main)


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def guarded(main: Callable[[], int | None]) -> int:
    """Expected failures (bad config, missing files, mismatched tokenizer) end in a clean message."""
    try:
        return main() or 0
    except AlreadyFinished as err:
        if os.environ.get("RANK", "0") == "0":
            print(err, flush=True)
        return 0
    except ConfigError as err:
        lines = str(err).splitlines()
        print(f"error: {len(lines)} problem(s) in the configuration:", file=sys.stderr)
        for line in lines:
            print(f"  {line}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        fail(str(err), code=3)
    except (FileNotFoundError, PermissionError, ValueError) as err:  # an unwritable output_dir is PermissionError
        fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
