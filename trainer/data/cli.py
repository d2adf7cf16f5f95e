"""Error handling shared by the data command lines (prepare_data, train_tokenizer, make_demo_data)."""
from __future__ import annotations

import sys
from typing import Callable


def run_cli(main: Callable[[], int | None]) -> int:
    """Bad input ends in one `error: ...` line on stderr and exit status 2, not a traceback."""
    try:
        return main() or 0
    except (FileNotFoundError, ValueError) as err:  # DataError is a ValueError
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
