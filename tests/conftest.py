"""The Triton kernels run here under the interpreter (no GPU on CI machines): it must be chosen
before triton is imported. On a GPU machine, run `TRITON_INTERPRET=0 pytest -m gpu` to test the
compiled kernels instead.

Under `pytest -n N` (pytest-xdist, as the README's test command runs) each worker gets its share
of the cores, it and the processes its tests start: torch's default of one thread per core in
every worker oversubscribes the machine, and its OpenMP threads then spin and thrash."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# the CPU's feature flags as the tests see them, in every process they start: none, so that what an
# auto choice on the CPU gives (fp32, not bf16) does not depend on the machine CI runs on
os.environ.setdefault("PRERESNET_CPU_FLAGS", "")
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))
