"""bn_ext: BatchNorm, LayerNorm, RMSNorm, GroupNorm and InstanceNorm kernels for PyTorch."""

# Before the extension loads: one built against another torch fails with an
# undefined symbol, which names neither version.
try:
    from bn_ext import _build_info
except ImportError as error:
    raise ImportError("bn_ext is not built: run `make` in its checkout, or install it with "
                      "`pip install --no-build-isolation .`") from error
import torch as _torch

if _torch.__version__ != _build_info.TORCH_VERSION:
    raise ImportError(f"bn_ext was built against torch {_build_info.TORCH_VERSION}, but torch {_torch.__version__} "
                      "is installed: rebuild bn_ext under this torch (`make`, or "
                      "`pip install --no-build-isolation .`), or install torch " + _build_info.TORCH_VERSION)

from bn_ext import nn
from bn_ext.cpu import cpu_capabilities, cpu_capability
from bn_ext.fold import (
    FoldReport,
    FoldVerificationError,
    fold_model,
    fuse_bn_conv,
    fuse_bn_linear,
    fuse_conv_bn,
    fuse_layer_norm_linear,
    fuse_linear_bn,
)
from bn_ext.functional import (
    batch_norm,
    batch_norm_act,
    batch_renorm,
    group_norm,
    instance_norm,
    layer_norm,
    layer_norm_channels,
    rms_norm,
)
from bn_ext.recalibration import recalibrate_batch_norm
from bn_ext.equalization import EqualizationReport, equalize, quantization_error
from bn_ext.memory import (
    CpuOutputCacheStats,
    cpu_output_cache_stats,
    empty_cpu_output_cache,
    set_cpu_output_cache_limit,
)

__all__ = [
    "EqualizationReport",
    "equalize",
    "quantization_error",
    "CpuOutputCacheStats",
    "FoldReport",
    "FoldVerificationError",
    "batch_norm",
    "batch_norm_act",
    "batch_renorm",
    "cpu_capabilities",
    "cpu_capability",
    "cpu_output_cache_stats",
    "empty_cpu_output_cache",
    "fold_model",
    "fold_onnx",
    "fuse_bn_conv",
    "fuse_bn_linear",
    "fuse_conv_bn",
    "fuse_layer_norm_linear",
    "fuse_linear_bn",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "layer_norm_channels",
    "nn",
    "recalibrate_batch_norm",
    "rms_norm",
    "set_cpu_output_cache_limit",
]
__version__ = "0.1.0"


def fold_onnx(model, **kwargs):
    """Fold the eval BatchNormalization nodes of an ONNX model or file; see
    bn_ext.onnx_fold.fold_onnx (imported on first use: onnx and onnxruntime
    are needed only here)."""
    from bn_ext.onnx_fold import fold_onnx as fold

    return fold(model, **kwargs)
