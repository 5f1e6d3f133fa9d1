"""bn_ext: BatchNorm, LayerNorm and RMSNorm kernels for PyTorch."""

from bn_ext import nn
from bn_ext.functional import batch_norm, layer_norm, rms_norm

__all__ = ["batch_norm", "layer_norm", "nn", "rms_norm"]
__version__ = "0.1.0"
