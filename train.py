"""train.py in a checkout: the command preresnet/train_cli.py defines (installed: preresnet-train).
python train.py --help says what it trains and how."""

if __name__ == "__main__":  # stop signals are handled from the first line on, before torch is imported
    import os
    import time

    STARTED = time.monotonic()  # the command's start: --time-limit counts from here

    from preresnet import faults

    faults.install(repeat_interrupts=int(os.environ.get("WORLD_SIZE", "1")) <= 1)

import sys  # noqa: E402

from preresnet.train_cli import build_parser, main  # noqa: E402, F401  (tests and the docs' checks use them as train.py's)
from preresnet.train_cli import cli as package_cli  # noqa: E402


def cli(argv: list[str] | None = None, started: float | None = None) -> int:
    return package_cli(argv, prog="train.py", started=started)


if __name__ == "__main__":
    sys.exit(cli(started=STARTED))
