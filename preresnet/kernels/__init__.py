"""Triton kernels for the pre-activation unit: BatchNorm -> ReLU -> conv [+ residual], fused.

On a machine without a GPU they run only under the Triton interpreter: set TRITON_INTERPRET=1
before triton is imported. Importing this package imports nothing heavy: `kernels.batchnorm` and
`kernels.workspace` (who owns the kernels' ticket counters) are plain PyTorch, and the kernels'
names below load Triton on first use.
"""

__all__ = ["INTERPRETED", "BnState", "bn_relu_conv", "bn_relu_conv_ref"]


def __getattr__(name: str):
    if name in __all__:
        from . import preact_conv

        return getattr(preact_conv, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
