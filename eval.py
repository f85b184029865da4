"""eval.py in a checkout: the command preresnet/evaluate_cli.py defines (installed: preresnet-eval).
python eval.py --help says what it evaluates and how."""

import sys

from preresnet.evaluate_cli import build_parser, main  # noqa: F401  (tests and the docs' checks use them as eval.py's)
from preresnet.evaluate_cli import cli as package_cli


def cli(argv: list[str] | None = None) -> int:
    return package_cli(argv, prog="eval.py")


if __name__ == "__main__":
    sys.exit(cli())
