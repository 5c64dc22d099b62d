"""Shared command-line plumbing: every stage entry point runs through `run_main`."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from stages.errors import TidepoolError


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a stage's main(); a TidepoolError becomes one `error:` line and exit status 2.

    Library tracebacks are for bugs. Problems with input or upstreams are reported as a sentence
    naming the file or URL, which is what a person running `dvc repro` can act on.
    """
    logging.basicConfig(
        level=os.environ.get("TIDEPOOL_LOG", "INFO"),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        status = main(argv)
    except TidepoolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)
