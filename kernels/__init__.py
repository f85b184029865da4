"""Triton kernels for the pre-activation unit: BatchNorm -> ReLU -> conv [+ residual], fused.

On a machine without a GPU they run only under the Triton interpreter: set TRITON_INTERPRET=1
before triton is imported.
"""

from .preact_conv import INTERPRETED, bn_relu_conv, bn_relu_conv_ref

__all__ = ["INTERPRETED", "bn_relu_conv", "bn_relu_conv_ref"]
