"""Shared test helpers: the per-dtype tolerance table, the error-ratio check
against torch's own kernels, and float64 references."""

import copy
import os
from pathlib import Path

import pytest
import torch

import bn_ext  # noqa: F401  (loads the operators)
from bn_ext import _build_info

# The compiled operators and kernels: libbn_ext, which bn_ext._C (the Python
# bindings alone) loads from the package folder.
LIBRARY_PATH = Path(bn_ext.__file__).with_name(_build_info.LIBRARY)

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

# Unit roundoff: the largest relative error of one rounding to the type.
ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}

# How much larger than a peer's error (torch's kernel; bn_ext's CPU kernel
# for the CUDA kernels) against the float64 reference bn_ext's may be. Two
# float32 summation orders of the same values differ by a few times in their
# worst element: the largest ratio measured on these tests is 4.4 at AVX512
# and 5.6 at AVX2, BatchNorm grad_weight of a strided (24, 2, 40, 40) input,
# where torch's strided path sums with TensorIterator's cascade. A fault
# moves results by hundreds of roundings: a dropped element, a halved
# reduction, a wrong term.
ERROR_RATIO = 8.0


def in_float64(args):
    """Operator arguments with every floating tensor in float64 (the reference's)."""
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def op_math(dtype):
    """The type a kernel computes in for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def param_dtype(dtype):
    """Parameters of a half-precision model are float32 here (mixed precision)."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def last_level_cache_bytes():
    """The largest cache Linux lists for cpu0, as the CPU kernels read it (else
    32 MB): passes with at least this many output bytes use streaming stores."""
    from bn_ext.bench import last_level_cache_bytes as largest_cache

    return largest_cache()


def assert_close(actual, expected, dtype, atol_scale=1.0, msg=""):
    """Within the dtype's table tolerance. atol_scale is for results that are
    differences of larger values (cancellation): the magnitude of those values,
    never a factor on rtol."""
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=atol * atol_scale, rtol=rtol, equal_nan=True, msg=msg or None
    )


def max_error(actual, reference):
    """The largest absolute difference; a NaN or infinity where the reference
    has none (or the reverse) is an infinite error."""
    a, r = actual.detach().double(), reference.detach().double()
    if a.numel() == 0:
        return 0.0
    same = (a == r) | (a.isnan() & r.isnan())
    diff = torch.where(same, torch.zeros_like(a), (a - r).abs())
    return diff.nan_to_num(nan=float("inf")).max().item()


def assert_error_within(actual, reference, peer, k=ERROR_RATIO, msg="", dtype=None, magnitude=None):
    """actual's error against the float64 reference is at most k times the
    peer's (the same operation by another implementation on the same rounded
    inputs), and never needs to be below k roundings of the largest value (a
    peer can be exact by luck). dtype is the precision the result was computed
    in (default: actual's). magnitude, where given, is the largest term of a
    sum that cancels to a smaller result: no sum in the op-math type is more
    exact than a rounding of that term. Float64 computations have no more
    precise reference: they are held to the table tolerance instead."""
    assert actual.shape == reference.shape, f"{msg}: shape {tuple(actual.shape)} vs {tuple(reference.shape)}"
    dtype = dtype or actual.dtype
    if dtype == torch.float64:
        scale = reference.double().abs().max().item() if reference.numel() else 1.0
        assert_close(actual, reference, torch.float64, atol_scale=max(1.0, scale), msg=msg)
        return
    finite = reference.double()[reference.isfinite()]
    largest = finite.abs().max().item() if finite.numel() else 0.0
    magnitude = max(largest, float(magnitude or 0.0))
    ours, theirs = max_error(actual, reference), max_error(peer, reference)
    limit = k * max(theirs, ROUNDOFF[dtype] * magnitude)
    if os.environ.get("BN_EXT_ERROR_LOG"):  # the measured ratios, for choosing and stating k
        with open(os.environ["BN_EXT_ERROR_LOG"], "a") as log:
            test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
            log.write(f"{ours / limit * k if limit else 0:.3f}\t{test}\t{msg}\t{dtype}\t{ours:.3g}\t{theirs:.3g}\n")
    assert ours <= limit, (f"{msg}: error {ours:.3g} against float64, the peer's {theirs:.3g}, "
                           f"allowed {limit:.3g} (largest value {magnitude:.3g})")


def check_training_step(ref, ours, x):
    """One forward and backward of both models and of a float64 copy: the
    output and every parameter's gradient of the converted model are as close
    to float64 as torch.nn's (assert_error_within), and buffers agree."""
    ref64 = copy.deepcopy(ref).double()
    out_ref, out, out64 = ref(x), ours(x), ref64(x.double())
    assert_error_within(out, out64, out_ref, msg="output")
    g = torch.randn_like(out)
    out_ref.backward(g)
    out.backward(g)
    out64.backward(g.double())
    for (name, p_ref), (_, p), (_, p64) in zip(ref.named_parameters(), ours.named_parameters(),
                                               ref64.named_parameters()):
        assert_error_within(p.grad, p64.grad, p_ref.grad, msg=name)
    for (name, b_ref), (_, b) in zip(ref.named_buffers(), ours.named_buffers()):
        torch.testing.assert_close(b, b_ref, msg=name)


def randomise_batch_norms(model, seed=1):
    """Random running statistics and affine parameters in every BatchNorm of
    a model built without weights; returns it in eval mode."""
    from torch.nn.modules.batchnorm import _BatchNorm

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.normal_(generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(generator=g)
    return model.eval()


@pytest.fixture
def threads():
    """Restore the thread count a test changes."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# --- `pytest --quick` (`make check`): a sample of each test's cases ---------
#
# Each parametrized test keeps the fewest of its cases that still hold every
# value of every parameter at least once (each dtype, layout, shape, mode, op
# once), chosen greedily in collection order, so the sample is the same on
# every run. The emulated CUDA tests keep one thread order: the random one,
# which catches what the fixed orders do (a missing barrier, a race).
QUICK_SINGLE_VALUE = {"order": "random"}


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true",
                     help="run a sample of each parametrized test that holds every parameter value once")


def _value_key(value):
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)


def _quick_sample(items):
    """The items to keep from one test's cases: a greedy cover of its
    (parameter, value) pairs."""
    pairs = [{(name, _value_key(value)) for name, value in item.callspec.params.items()} for item in items]
    uncovered = set().union(*pairs)
    keep = []
    while uncovered:
        best = max(range(len(items)), key=lambda i: (len(pairs[i] & uncovered), -i))
        keep.append(items[best])
        uncovered -= pairs[best]
    return keep


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--quick"):
        return
    groups, order = {}, []
    for item in items:
        spec = getattr(item, "callspec", None)
        if spec is not None and any(spec.params.get(k, v) != v for k, v in QUICK_SINGLE_VALUE.items()):
            continue
        key = (item.module.__name__, item.originalname) if spec is not None else item.nodeid
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(item)
    kept = []
    for key in order:
        group = groups[key]
        kept += _quick_sample(group) if hasattr(group[0], "callspec") else group
    chosen = set(id(item) for item in kept)
    config.hook.pytest_deselected(items=[item for item in items if id(item) not in chosen])
    items[:] = [item for item in items if id(item) in chosen]
