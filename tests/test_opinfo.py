"""torch's own OpInfo samples for batch_norm, layer_norm and rms_norm (empty
inputs of every rank torch accepts among them): bn_ext's functional API must
behave as torch.nn.functional does on each, the same result or the same
exception type, running statistics updated alike, and in float64 the same
gradients."""

import copy

import pytest
import torch
from torch.testing._internal.common_methods_invocations import op_db

import bn_ext
from conftest import DTYPES, assert_close

OURS = {
    "nn.functional.batch_norm": bn_ext.batch_norm,
    "nn.functional.layer_norm": bn_ext.layer_norm,
    "nn.functional.rms_norm": bn_ext.rms_norm,
}
OPS = [op for op in op_db if op.name in OURS and op.variant_test_name == ""]


def run(fn, sample):
    """fn on a private copy of the sample: (result or exception, the copy's tensors after the call)."""
    args = copy.deepcopy((sample.input, sample.args, sample.kwargs))
    try:
        return fn(args[0], *args[1], **args[2]), args
    except Exception as error:  # noqa: BLE001  (the type is what is compared)
        return error, args


def tensors(args):
    x, positional, keywords = args
    return [t for t in (x, *positional, *keywords.values()) if isinstance(t, torch.Tensor)]


def test_every_op_has_samples():
    assert sorted(op.name for op in OPS) == sorted(OURS)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_samples_behave_as_torch(op, dtype):
    samples = list(op.sample_inputs("cpu", dtype, requires_grad=False))
    assert samples
    for i, sample in enumerate(samples):
        want, want_args = run(op.op, sample)
        got, got_args = run(OURS[op.name], sample)
        what = f"sample {i}: input {tuple(sample.input.shape)}, {len(sample.args)} args, {sorted(sample.kwargs)}"
        if isinstance(want, Exception):
            assert type(got) is type(want), f"{what}: torch raised {want!r}, bn_ext gave {got!r}"
            continue
        assert not isinstance(got, Exception), f"{what}: torch accepts it, bn_ext raised {got!r}"
        assert got.shape == want.shape and got.dtype == want.dtype, what
        assert_close(got, want, dtype, msg=what)
        # The running statistics (updated in place in training) alike.
        for a, b in zip(tensors(got_args), tensors(want_args)):
            assert_close(a, b, dtype, msg=f"{what}: an argument after the call")


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_sample_gradients_match_torch_in_float64(op):
    for i, sample in enumerate(op.sample_inputs("cpu", torch.float64, requires_grad=True)):
        want, want_args = run(op.op, sample)
        if isinstance(want, Exception):
            continue
        got, got_args = run(OURS[op.name], sample)
        inputs = [t for t in tensors(want_args) if t.requires_grad]
        ours = [t for t in tensors(got_args) if t.requires_grad]
        if not inputs or want.numel() == 0:
            continue
        grad = torch.linspace(-1, 1, want.numel(), dtype=torch.float64).reshape(want.shape)
        expected = torch.autograd.grad(want, inputs, grad, allow_unused=True)
        actual = torch.autograd.grad(got, ours, grad, allow_unused=True)
        for a, e in zip(actual, expected):
            assert (a is None) == (e is None), f"sample {i}"
            if e is not None:
                assert_close(a, e, torch.float64, atol_scale=max(1.0, e.abs().max().item()), msg=f"sample {i}")
