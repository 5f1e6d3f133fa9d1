"""bn_ext: BatchNorm, LayerNorm and RMSNorm kernels for PyTorch."""

from bn_ext import nn
from bn_ext.cpu import cpu_capabilities, cpu_capability
from bn_ext.fold import (
    FoldReport,
    fold_model,
    fuse_bn_conv,
    fuse_bn_linear,
    fuse_conv_bn,
    fuse_layer_norm_linear,
    fuse_linear_bn,
)
from bn_ext.functional import batch_norm, layer_norm, rms_norm
from bn_ext.memory import (
    CpuOutputCacheStats,
    cpu_output_cache_stats,
    empty_cpu_output_cache,
    set_cpu_output_cache_limit,
)

__all__ = [
    "CpuOutputCacheStats",
    "FoldReport",
    "batch_norm",
    "cpu_capabilities",
    "cpu_capability",
    "cpu_output_cache_stats",
    "empty_cpu_output_cache",
    "fold_model",
    "fuse_bn_conv",
    "fuse_bn_linear",
    "fuse_conv_bn",
    "fuse_layer_norm_linear",
    "fuse_linear_bn",
    "layer_norm",
    "nn",
    "rms_norm",
    "set_cpu_output_cache_limit",
]
__version__ = "0.1.0"
