"""The staged plan for short GPU sessions: `python -m tools.gpu_plan STAGE ...` (README.md beside
this file; plan.py has the command line).

build_parser and main are plan.py's, loaded on first use: importing the package (as
`python -m tools.gpu_plan.dali_transfer` does on the GPU machine) loads none of the stages."""

__all__ = ["build_parser", "main"]


def __getattr__(name: str):
    if name in __all__:
        from tools.gpu_plan import (
            plan,  # deferred: plan imports every stage, and they the benchmark layer
        )

        return getattr(plan, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
