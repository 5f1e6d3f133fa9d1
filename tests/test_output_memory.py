"""Large CPU outputs are advised for transparent huge pages (see
csrc/cpu/output_memory.h); the caller's tensors are left alone."""

import sys

import pytest
import torch

import bn_ext

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise advice is Linux-only")

HUGE_PAGE = 2 << 20


def vm_flags(address):
    """The VmFlags of the mapping of this process that holds `address`."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def first_huge_page(t):
    return (t.data_ptr() + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE


@pytest.mark.parametrize("op", ["batch_norm", "batch_norm_backward", "layer_norm", "rms_norm"])
def test_large_outputs_are_advised_and_inputs_are_not(op):
    x = torch.randn(64, 16, 64, 64, requires_grad=op == "batch_norm_backward")  # 16 MB
    # (x may reuse memory advised before, so its flags are compared, not assumed.)
    x_flags = vm_flags(first_huge_page(x))
    if op == "batch_norm":
        out = bn_ext.batch_norm(x, None, None, training=True)
    elif op == "batch_norm_backward":
        (out,) = torch.autograd.grad(bn_ext.batch_norm(x, None, None, training=True), x, torch.ones_like(x))
    elif op == "layer_norm":
        out = bn_ext.layer_norm(x, (64,))
    else:
        out = bn_ext.rms_norm(x, (64,))
    assert "hg" in vm_flags(first_huge_page(out))
    assert vm_flags(first_huge_page(x)) == x_flags
