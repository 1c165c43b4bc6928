"""The error boundary of every command-line entry point.

    sys.exit(run_cli(lambda: main(argv)))

A `GptMoeError` (bad input: a config key, a file, a checkpoint) is printed as one line,
`error: ...`, on stderr and the process exits with 2; Ctrl-C exits with 130 after an optional
hint (how to resume); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from gpt_moe.errors import GptMoeError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def run_cli(body: Callable[[], int | None], interrupted_hint: str = "") -> int:
    """Runs `body` and returns the process exit code (its return value, 0 for None)."""
    try:
        return body() or 0
    except GptMoeError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted" + (f"; {interrupted_hint}" if interrupted_hint else ""), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
