"""The GPU plan's tests run as tests/ does (tests/conftest.py): the Triton kernels under the
interpreter (no GPU on CI machines), chosen before triton is imported; no CPU feature flags, so an
auto choice on the CPU (fp32, not bf16) does not depend on the machine; and under `pytest -n N` each
worker, with the processes its tests start (the plan's stages, train.py), its share of the cores."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("PRERESNET_CPU_FLAGS", "")
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))
