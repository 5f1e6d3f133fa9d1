"""The operator contract, every operator over its samples (op_samples.py):
torch.library.opcheck checks the schema (mutation and aliasing annotations),
the fake kernel against the real one, the autograd registration, and AOT
dispatch with static and dynamic shapes."""

import pytest
import torch
from torch.library import opcheck

import bn_ext  # noqa: F401  (registers the operators)
from op_samples import DEVICE_OPERATORS, operator_runner, check_samples, registered_operators, samples

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


def _float64(args):
    return tuple(a.detach().double().requires_grad_(a.requires_grad)
                 if isinstance(a, torch.Tensor) and a.dtype in (torch.float32, torch.float64) else a for a in args)


def _differentiable_samples(op):
    """op's samples with a tensor that requires grad, in float64 (bfloat16 ones left out)."""
    return [_float64(args) for args in samples(op)
            if any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
            and not any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args)]


# The forward and composite operators with differentiable samples. Backward
# operators are differentiated through their forwards (gradgradcheck below):
# their own inputs include the saved statistics, which the formulas recompute.
# batch_renorm holds r and d constant in its backward (the paper's
# stop-gradient), so its gradient is not the numerical one except where r
# and d are clipped (test_batch_renorm.py checks it there).
DIFFERENTIABLE = [op for op in OPERATORS if not op.endswith("_backward") and not op.startswith("batch_renorm")
                  and _differentiable_samples(op)]


@pytest.mark.parametrize("op", DIFFERENTIABLE)
def test_gradcheck_and_gradgradcheck(op):
    name, _, overload = op.partition(".")
    handle = getattr(getattr(torch.ops.bn_ext, name), overload or "default")
    for args in _differentiable_samples(op):
        inputs = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

        def call(*values, args=args, inputs=inputs):
            # Fresh copies of what the operator may move in place (running statistics).
            given = [a.clone() if isinstance(a, torch.Tensor) and not a.requires_grad else a for a in args]
            for i, v in zip(inputs, values):
                given[i] = v
            return handle(*given)

        primals = [args[i] for i in inputs]
        assert torch.autograd.gradcheck(call, primals)
        assert torch.autograd.gradgradcheck(call, primals)


@pytest.mark.parametrize("op", DEVICE_OPERATORS)
def test_samples_against_float64(op):
    """Every device operator's samples on the CPU (at each kernel level: make
    test runs this file at every level) against the float64 reference."""
    check_samples(op, operator_runner(torch.ops.bn_ext))
