"""Large CPU outputs (see csrc/cpu/output_memory.h and bn_ext/memory.py): their
memory comes from a bounded cache of the memory of freed bn_ext outputs, or,
on a miss, from torch's own CPU allocation; the caller's tensors are left alone."""

import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

import bn_ext

HUGE_PAGE = 2 << 20
MB = 1 << 20


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


@pytest.fixture
def cache():
    """An empty cache with the default limit, restored afterwards."""
    limit = bn_ext.cpu_output_cache_stats().limit_bytes
    bn_ext.set_cpu_output_cache_limit(1 << 30)
    bn_ext.empty_cpu_output_cache()
    yield
    bn_ext.set_cpu_output_cache_limit(limit)


def large_input(seed=0, mean=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 16, 64, 64, generator=g) + mean  # 16 MB


def run_op(op, x):
    if op == "batch_norm":
        return bn_ext.batch_norm(x, None, None, training=True)
    if op == "batch_norm_backward":
        x = x.detach().requires_grad_()
        return torch.autograd.grad(bn_ext.batch_norm(x, None, None, training=True), x, torch.ones_like(x))[0]
    if op == "layer_norm":
        return bn_ext.layer_norm(x, (64,))
    return bn_ext.rms_norm(x, (64,))


def reference(op, x):
    x = x.double()
    if op == "batch_norm":
        return F.batch_norm(x, None, None, training=True)
    if op == "batch_norm_backward":
        x = x.detach().requires_grad_()
        return torch.autograd.grad(F.batch_norm(x, None, None, training=True), x, torch.ones_like(x))[0]
    if op == "layer_norm":
        return F.layer_norm(x, (64,))
    return F.rms_norm(x, (64,), eps=torch.finfo(torch.float32).eps)


OPS = ["batch_norm", "batch_norm_backward", "layer_norm", "rms_norm"]


def check_a_miss_takes_memory_as_torch_does(op):
    x = large_input()
    x_flags = vm_flags(first_huge_page(x))
    bn_ext.empty_cpu_output_cache()
    before = bn_ext.cpu_output_cache_stats()
    out = run_op(op, x)
    assert bn_ext.cpu_output_cache_stats().misses > before.misses
    assert "hg" not in vm_flags(first_huge_page(out))
    assert vm_flags(first_huge_page(x)) == x_flags


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
@pytest.mark.parametrize("op", OPS)
def test_a_miss_takes_memory_as_torch_does(op):
    # No huge-page advice of bn_ext's own (its first touch was far slower
    # than 4 KB pages' on some machines), on the output or the input. In a
    # fresh process: after the folding and ONNX tests, glibc serves 16 MB
    # from heap pages that some library advised (seen with VmFlags hg).
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
            f"import test_output_memory as t; t.check_a_miss_takes_memory_as_torch_does({op!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("op", OPS)
def test_freed_output_memory_is_reused_and_overwritten(op, cache):
    first = run_op(op, large_input(seed=1, mean=5.0))
    address = first.data_ptr()
    before = bn_ext.cpu_output_cache_stats()
    del first
    after_free = bn_ext.cpu_output_cache_stats()
    assert after_free.cached_bytes == before.cached_bytes + 16 * MB
    assert after_free.in_use_bytes == before.in_use_bytes - 16 * MB
    x = large_input(seed=2)
    second = run_op(op, x)
    stats = bn_ext.cpu_output_cache_stats()
    # (Backward also allocates and frees a forward output, from the cache too.)
    assert stats.misses == after_free.misses
    if op != "batch_norm_backward":
        assert second.data_ptr() == address
        assert stats.hits == after_free.hits + 1
    torch.testing.assert_close(second.double(), reference(op, x), atol=1e-4, rtol=1e-4)


def test_live_outputs_never_share_memory(cache):
    x = large_input()
    outs = [bn_ext.layer_norm(x, (64,)) for _ in range(3)]
    assert len({o.data_ptr() for o in outs}) == 3
    expected = outs[1].clone()
    outs[0].fill_(1.0)
    outs[2].fill_(2.0)
    assert torch.equal(outs[1], expected)
    assert bn_ext.cpu_output_cache_stats().in_use_bytes >= 3 * 16 * MB


def test_limit_bounds_kept_memory(cache):
    bn_ext.set_cpu_output_cache_limit(20 * MB)
    x = large_input()
    a, b = bn_ext.layer_norm(x, (64,)), bn_ext.layer_norm(x, (64,))
    del a, b
    assert bn_ext.cpu_output_cache_stats().cached_bytes == 16 * MB
    bn_ext.set_cpu_output_cache_limit(8 * MB)  # releases what no longer fits
    assert bn_ext.cpu_output_cache_stats().cached_bytes == 0


def test_zero_limit_turns_the_cache_off(cache):
    x = large_input()
    bn_ext.layer_norm(x, (64,))  # freed at once: something to release
    bn_ext.set_cpu_output_cache_limit(0)
    before = bn_ext.cpu_output_cache_stats()
    assert before.cached_bytes == 0
    out = bn_ext.layer_norm(x, (64,))
    # New memory, not kept once freed.
    torch.testing.assert_close(out.double(), reference("layer_norm", x), atol=1e-4, rtol=1e-4)
    del out
    after = bn_ext.cpu_output_cache_stats()
    assert (after.hits, after.misses) == (before.hits, before.misses + 1)
    assert (after.cached_bytes, after.in_use_bytes) == (0, before.in_use_bytes)


def test_small_outputs_do_not_use_the_cache(cache):
    before = bn_ext.cpu_output_cache_stats()
    bn_ext.layer_norm(torch.randn(64, 64), (64,))
    after = bn_ext.cpu_output_cache_stats()
    assert (after.hits, after.misses) == (before.hits, before.misses)


def test_empty_releases_everything_and_keeps_the_limit(cache):
    bn_ext.set_cpu_output_cache_limit(64 * MB)
    bn_ext.layer_norm(large_input(), (64,))  # freed at once
    assert bn_ext.cpu_output_cache_stats().cached_bytes > 0
    bn_ext.empty_cpu_output_cache()
    stats = bn_ext.cpu_output_cache_stats()
    assert stats.cached_bytes == 0 and stats.limit_bytes == 64 * MB


def test_outputs_freed_on_other_threads(cache):
    x = large_input()
    before = bn_ext.cpu_output_cache_stats()
    outs = [bn_ext.layer_norm(x, (64,)) for _ in range(8)]

    def free(i):
        outs[i] = None

    workers = [threading.Thread(target=free, args=(i,)) for i in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stats = bn_ext.cpu_output_cache_stats()
    assert stats.in_use_bytes == before.in_use_bytes
    assert stats.cached_bytes == before.cached_bytes + 8 * 16 * MB


def test_cached_output_can_be_resized(cache):
    out = bn_ext.layer_norm(large_input(), (64,))
    head = out.flatten()[:100].clone()
    out.resize_(2 * out.numel())
    assert torch.equal(out[:100], head)


def test_profiler_sees_cached_allocations(cache):
    from torch.profiler import ProfilerActivity, profile

    x = large_input()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        bn_ext.layer_norm(x, (64,))
    allocated = sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)
    assert allocated >= 16 * MB


@pytest.mark.parametrize("value", [1.5, "1", True, None])
def test_limit_must_be_an_int(value):
    with pytest.raises(TypeError, match="nbytes must be an int"):
        bn_ext.set_cpu_output_cache_limit(value)


def test_limit_must_not_be_negative():
    with pytest.raises(ValueError, match="nbytes must be >= 0, got -1"):
        bn_ext.set_cpu_output_cache_limit(-1)


@pytest.mark.parametrize("value,expect", [("12345", "12345"), ("0", "0"), ("lots", "BN_EXT_OUTPUT_CACHE_BYTES must be")])
def test_limit_from_the_environment(value, expect):
    code = (
        "import torch, bn_ext\n"
        "try:\n"
        "    bn_ext.layer_norm(torch.randn(64, 16, 64, 64), (64,))\n"
        "    print(bn_ext.cpu_output_cache_stats().limit_bytes)\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    env = dict(os.environ, BN_EXT_OUTPUT_CACHE_BYTES=value)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert expect in result.stdout


def test_fork_while_another_thread_holds_the_cache_lock():
    # A child forked while another thread held the cache's lock inherited it
    # locked and waited forever on its first large output (DataLoader
    # workers and multiprocessing fork). Here a thread holds the lock for a
    # second when the main thread forks; the child makes a large output and
    # exits. In a subprocess of its own, so that a hang is a timeout here.
    code = (
        "import os, sys, threading, time, torch, bn_ext\n"
        "from bn_ext import _C\n"
        "bn_ext.layer_norm(torch.randn(64, 16, 64, 64), (64,))  # the cache in use\n"
        "holder = threading.Thread(target=_C._hold_output_cache_lock, args=(1.0,))\n"
        "holder.start()\n"
        "time.sleep(0.3)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    torch.set_num_threads(1)\n"
        "    out = bn_ext.layer_norm(torch.randn(64, 16, 64, 64), (64,))\n"
        "    os._exit(0 if out.shape == (64, 16, 64, 64) else 3)\n"
        "holder.join()\n"
        "deadline = time.monotonic() + 60\n"
        "while time.monotonic() < deadline:\n"
        "    done, status = os.waitpid(pid, os.WNOHANG)\n"
        "    if done:\n"
        "        sys.exit(os.waitstatus_to_exitcode(status))\n"
        "    time.sleep(0.05)\n"
        "os.kill(pid, 9)\n"
        "sys.exit('the forked child hung on its first large output')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
