"""bn_ext: BatchNorm, LayerNorm and RMSNorm kernels for PyTorch."""

from bn_ext import nn
from bn_ext.functional import batch_norm

__all__ = ["batch_norm", "nn"]
__version__ = "0.1.0"
