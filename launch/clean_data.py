"""Clean a raw corpus with a recipe: quality filters, dedup, PII scrubbing, decontamination.

    python launch/clean_data.py --config configs/data/web.yaml [key=value ...]
    python launch/clean_data.py --config configs/data/web.yaml --report-only

Keys are dotted config paths (e.g. input.path=raw/ executor.workers=8). Re-running the same
command resumes: finished tasks are skipped.
"""
from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.markup import escape


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe YAML (configs/data/*.yaml)")
    parser.add_argument("--report-only", action="store_true", help="rebuild report.json from a run folder")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)

    from datapipe.config import ConfigError, load_config
    from datapipe.execute import RunError
    from datapipe.readers import BadInputError
    from datapipe.report import print_report
    from datapipe.run import report_only, run_pipeline
    from datapipe.steps import StepConfigError

    console = Console(stderr=True)
    try:
        cfg = load_config(args.config, args.overrides)
        report = report_only(cfg) if args.report_only else run_pipeline(cfg)
    except (ConfigError, StepConfigError, BadInputError, RunError, FileNotFoundError) as err:
        console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
        return 2
    if report is None:
        console.print("submitted; when the jobs end, run again with --report-only to write the report")
        return 0
    print_report(report, Console())
    return 0


if __name__ == "__main__":
    sys.exit(main())
