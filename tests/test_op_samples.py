"""The operator contract, every operator over its samples (op_samples.py):
torch.library.opcheck checks the schema (mutation and aliasing annotations),
the fake kernel against the real one, the autograd registration, and AOT
dispatch with static and dynamic shapes."""

import pytest
import torch
from torch.library import opcheck

import bn_ext  # noqa: F401  (registers the operators)
from op_samples import registered_operators, samples

OPERATORS = registered_operators()


def test_the_table_covers_every_registered_operator():
    assert len(OPERATORS) >= 21, OPERATORS
    missing = []
    for op in OPERATORS:
        try:
            assert samples(op), op
        except LookupError:
            missing.append(op)
    assert not missing, f"operators without samples: {missing}"


@pytest.mark.level_independent
@pytest.mark.parametrize("op", OPERATORS)
def test_opcheck(op):
    name, _, overload = op.partition(".")
    handle = getattr(getattr(torch.ops.bn_ext, name), overload or "default")
    for args in samples(op):
        opcheck(handle, args)
