"""The Triton kernels run here under the interpreter (no GPU on CI machines): it must be chosen
before triton is imported. On a GPU machine, run `TRITON_INTERPRET=0 pytest -m gpu` to test the
compiled kernels instead."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
