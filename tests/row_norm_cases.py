"""Inputs shared by the LayerNorm and RMSNorm tests."""

import pytest
import torch

from conftest import param_dtype

# Row lengths: 1 and odd sizes below/above every vector width, a typical
# hidden size, one longer than a cache chunk, and one not a multiple of it.
ROW_LENGTHS = [1, 3, 7, 64, 768, 1000, 4096, 65537]

# (input shape, normalized_shape): multi-dim normalized shapes, no leading
# dim, leading dims of size 0 and 1, many leading dims.
SHAPES = [
    pytest.param((5, 33), (33,), id="rows"),
    pytest.param((33,), (33,), id="no-leading"),
    pytest.param((2, 3, 4, 5), (4, 5), id="2d-normalized"),
    pytest.param((2, 3, 4, 5), (3, 4, 5), id="3d-normalized"),
    pytest.param((0, 6), (6,), id="zero-rows"),
    pytest.param((1, 1, 9), (9,), id="one-row"),
    pytest.param((64, 48), (48,), id="many-rows"),
]

# Memory layouts: contiguous, a strided slice of the last dim, a transposed view.
LAYOUTS = ["contiguous", "strided", "transposed"]


def make_row_input(shape, dtype, layout="contiguous", mean=0.5, std=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":
        full = torch.randn(*shape[:-1], shape[-1] * 2, generator=g, dtype=torch.float64)
        return (full * std + mean).to(dtype)[..., ::2]
    if layout == "transposed" and len(shape) >= 2:
        base = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g, dtype=torch.float64)
        return (base * std + mean).to(dtype).transpose(-1, -2)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(dtype)


def make_row_params(normalized_shape, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    p = param_dtype(dtype)
    weight = (torch.rand(normalized_shape, generator=g, dtype=torch.float64) + 0.5).to(p)
    bias = torch.randn(normalized_shape, generator=g, dtype=torch.float64).to(p)
    return weight, bias


def f64(t):
    return None if t is None else t.detach().double()
