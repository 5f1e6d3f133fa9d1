"""SyncBatchNorm over gloo on the loopback interface: 2 and 3 processes must
match one process over the concatenated batch."""

import copy
import datetime
import multiprocessing
import os
import socket
import traceback
import zlib

import pytest
import torch
import torch.distributed as dist

import bn_ext
from conftest import assert_close, assert_error_within

pytestmark = pytest.mark.processes

# (name, per-rank batch sizes for 2 and 3 ranks, dtype, memory format, spatial dims)
SCENARIOS = [
    ("equal", {2: [4, 4], 3: [3, 3, 3]}, torch.float32, "contiguous", (5, 6)),
    ("uneven", {2: [2, 7], 3: [1, 4, 6]}, torch.float32, "contiguous", (5, 6)),
    ("empty-rank", {2: [0, 5], 3: [3, 0, 4]}, torch.float32, "contiguous", (5, 6)),
    ("bfloat16", {2: [3, 5], 3: [2, 3, 4]}, torch.bfloat16, "contiguous", (4, 4)),
    ("channels-last", {2: [3, 4], 3: [2, 2, 3]}, torch.float32, "channels_last", (5, 6)),
    ("1d", {2: [6, 2], 3: [2, 2, 4]}, torch.float32, "contiguous", ()),
]
CHANNELS = 3
WORKER_TIMEOUT_S = 120


def scenario_data(name, counts, dtype, fmt, spatial):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    n = sum(counts)
    x = (torch.randn(n, CHANNELS, *spatial, generator=g) * 2 + 1).to(dtype)
    dy = torch.randn(n, CHANNELS, *spatial, generator=g).to(dtype)
    if fmt == "channels_last":
        x, dy = x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    return x, dy


def make_bn():
    torch.manual_seed(0)
    bn = bn_ext.nn.SyncBatchNorm(CHANNELS, momentum=0.3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    return bn


def small_net():
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
        torch.nn.Conv2d(6, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2),
    )


def _worker(rank, world, port, out_dir):
    try:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
        torch.set_num_threads(1)
        calls = {"all_gather": 0, "all_reduce": 0}
        for op in calls:
            original = getattr(dist, op)

            def counted(*args, _original=original, _op=op, **kwargs):
                calls[_op] += 1
                return _original(*args, **kwargs)

            setattr(dist, op, counted)
        results = {}
        for name, counts, dtype, fmt, spatial in SCENARIOS:
            counts = counts[world]
            x, dy = scenario_data(name, counts, dtype, fmt, spatial)
            start = sum(counts[:rank])
            local_x = x[start:start + counts[rank]].clone().requires_grad_()
            bn = make_bn().to(dtype if dtype == torch.float64 else torch.float32).train()
            before = dict(calls)
            out = bn(local_x)
            forward_calls = {k: calls[k] - before[k] for k in calls}
            out.backward(dy[start:start + counts[rank]])
            results[name] = {
                "out": out.detach(), "grad_x": local_x.grad, "grad_w": bn.weight.grad, "grad_b": bn.bias.grad,
                "running_mean": bn.running_mean, "running_var": bn.running_var,
                "forward_calls": forward_calls,
                "step_calls": {k: calls[k] - before[k] for k in calls},
            }
        # One DistributedDataParallel training step of a small conv net.
        net = bn_ext.nn.SyncBatchNorm.convert_sync_batchnorm(small_net())
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(5)
        data = torch.randn(4 * world, 3, 8, 8, generator=g)
        loss = ddp(data[4 * rank:4 * rank + 4]).square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        results["ddp_state"] = {k: v.detach().clone() for k, v in net.state_dict().items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears down while a peer still talks to it
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        raise


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, str(tmp_path))) for r in range(world)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(WORKER_TIMEOUT_S)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
    errors = [f.read_text() for f in tmp_path.glob("*.error")]
    assert not errors, "\n".join(errors)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def ranks(request, tmp_path_factory):
    world = request.param
    return world, run_ranks(world, tmp_path_factory.mktemp(f"sync{world}"))


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_matches_single_process_over_concatenated_batch(ranks, scenario):
    world, results = ranks
    name, counts, dtype, fmt, spatial = scenario
    x, dy = scenario_data(name, counts[world], dtype, fmt, spatial)
    ref = make_bn()
    ref_bn = torch.nn.BatchNorm1d(CHANNELS, momentum=0.3) if not spatial else torch.nn.BatchNorm2d(CHANNELS,
                                                                                                   momentum=0.3)
    ref_bn.load_state_dict(ref.state_dict())
    # torch's kernel over the whole batch in the scenario's dtype is the peer.
    peer_bn = copy.deepcopy(ref_bn)
    x_peer = x.clone().requires_grad_()
    peer_bn(x_peer).backward(dy)
    ref_bn.double()
    x64 = x.double().requires_grad_()
    out = ref_bn(x64)
    out.backward(dy.double())
    got = [r[name] for r in results]
    assert_close(torch.cat([g["out"] for g in got]), out.detach(), dtype)
    assert_error_within(torch.cat([g["grad_x"] for g in got]), x64.grad, x_peer.grad, msg="grad_input")
    # Parameter gradients are per-rank sums (DDP averages them): they add up.
    assert_error_within(sum(g["grad_w"] for g in got), ref_bn.weight.grad, peer_bn.weight.grad, msg="grad_weight")
    assert_error_within(sum(g["grad_b"] for g in got), ref_bn.bias.grad, peer_bn.bias.grad, msg="grad_bias")
    for g in got:
        torch.testing.assert_close(g["running_mean"].double(), ref_bn.running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g["running_var"].double(), ref_bn.running_var, rtol=1e-5, atol=1e-5)
        if fmt == "channels_last":
            assert g["out"].is_contiguous(memory_format=torch.channels_last) or g["out"].numel() == 0


def test_one_collective_per_forward_and_per_backward(ranks):
    _, results = ranks
    for r in results:
        for name, *_ in SCENARIOS:
            assert r[name]["forward_calls"] == {"all_gather": 1, "all_reduce": 0}
            assert r[name]["step_calls"] == {"all_gather": 1, "all_reduce": 1}


def test_ddp_step_matches_single_process(ranks):
    world, results = ranks
    net = small_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(5)
    data = torch.randn(4 * world, 3, 8, 8, generator=g)
    # DDP averages gradients over ranks: the single-process loss is the mean of the ranks' losses.
    loss = net(data).square().sum() / world
    opt.zero_grad()
    loss.backward()
    opt.step()
    for r in results:
        for k, v in net.state_dict().items():
            torch.testing.assert_close(r["ddp_state"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_falls_back_to_batch_norm_without_process_group():
    assert not dist.is_initialized()
    bn = make_bn()
    ref = torch.nn.BatchNorm2d(CHANNELS, momentum=0.3)
    ref.load_state_dict(bn.state_dict())
    x = torch.randn(4, CHANNELS, 5, 5)
    torch.testing.assert_close(bn(x), ref(x))
    torch.testing.assert_close(bn.running_var, ref.running_var)
    bn.eval()
    ref.eval()
    torch.testing.assert_close(bn(x), ref(x))


def test_convert_sync_batchnorm_keeps_state():
    model = small_net()
    model[4].eval()
    converted = bn_ext.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert type(converted[1]) is bn_ext.nn.SyncBatchNorm and type(converted[4]) is bn_ext.nn.SyncBatchNorm
    assert converted[1].training and not converted[4].training
    for k, v in model.state_dict().items():
        assert torch.equal(converted.state_dict()[k], v)
    assert isinstance(converted[1], torch.nn.modules.batchnorm._BatchNorm)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(converted(x), model(x))


def test_state_dict_loads_both_ways_with_torch():
    ours, theirs = bn_ext.nn.SyncBatchNorm(4), torch.nn.SyncBatchNorm(4)
    with torch.no_grad():
        theirs.running_mean.normal_()
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    assert torch.equal(ours.running_mean, theirs.running_mean)
    assert list(ours.state_dict()) == list(theirs.state_dict())


def test_bad_rank_is_value_error():
    with pytest.raises(ValueError, match="expected at least 2D input"):
        bn_ext.nn.SyncBatchNorm(3)(torch.randn(3))


def test_torchrun_example_trains(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
         str(root / "examples" / "train_sync_batchnorm.py")],
        capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 9: loss" in result.stdout
