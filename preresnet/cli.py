"""What train.py and eval.py share: one-line usage errors and the UserError -> exit status 2 rule."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit status 2, as before)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_main(main: Callable[[argparse.Namespace], object], args: argparse.Namespace, prog: str) -> int:
    """Run main(args); a UserError becomes one line on stderr and exit status 2."""
    try:
        main(args)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0
