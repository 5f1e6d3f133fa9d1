"""Shared test helpers: the per-dtype tolerance table and float64 references."""

import pytest
import torch

import bn_ext  # noqa: F401  (loads the operators)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
HALF_DTYPES = (torch.bfloat16, torch.float16)

# (atol, rtol) of a result in `dtype` against a float64 reference computed from
# the same (already rounded) input: one rounding of the output plus the
# op-math (float32) arithmetic.
TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 2e-2),
}


def param_dtype(dtype):
    """Parameters of a half-precision model are float32 here (mixed precision)."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def assert_close(actual, expected, dtype, scale=1.0, msg=""):
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=atol * scale, rtol=rtol * scale, equal_nan=True, msg=msg or None
    )


@pytest.fixture
def threads():
    """Restore the thread count a test changes."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
