"""bn_ext.recalibrate_batch_norm: running statistics equal to the pooled
statistics of everything each layer saw, with only BatchNorm in training."""

import copy
import datetime
import multiprocessing
import os
import traceback

import pytest
import torch
import torch.distributed as dist

import bn_ext
from test_sync_batch_norm import free_port

BATCH_SIZES = [2, 7, 1, 5]  # uneven on purpose: a per-batch average would weigh them equally


def net(norm=torch.nn.BatchNorm2d):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 5, 3, padding=1), norm(5), torch.nn.ReLU(), torch.nn.Dropout(0.5),
        torch.nn.Conv2d(5, 4, 3), norm(4),
    )


def batches(sizes=BATCH_SIZES, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 6, 6, generator=g) * 2 + 1 for n in sizes]


def pooled_reference(model, data, biased=False):
    """Each BatchNorm's pooled float64 statistics, the layers normalising with
    their batch statistics on the way (dropout off), computed with torch's ops."""
    conv1, bn1, _, _, conv2, _ = model
    first, second = [], []
    with torch.no_grad():
        for x in data:
            h1 = conv1(x)
            first.append(h1)
            z = torch.nn.functional.batch_norm(h1, None, None, bn1.weight, bn1.bias, True, 0.0, bn1.eps)
            second.append(conv2(torch.relu(z)))
    stats = []
    for values in (first, second):
        v = torch.cat(values).double()
        dims = [0, 2, 3]
        stats.append((v.mean(dims), v.var(dims, correction=0 if biased else 1)))
    return stats


@pytest.mark.parametrize("norm", ["torch", "bn_ext", "act", "sync"])
def test_statistics_are_pooled_exactly_over_uneven_batches(norm):
    cls = {"torch": torch.nn.BatchNorm2d, "bn_ext": bn_ext.nn.BatchNorm2d,
           "act": lambda c: bn_ext.nn.BatchNormAct2d(c, activation=None), "sync": bn_ext.nn.SyncBatchNorm}[norm]
    model = net(cls)
    data = batches()
    expected = pooled_reference(model, data)
    bn_ext.recalibrate_batch_norm(model, data)
    for bn, (mean, var) in zip((model[1], model[5]), expected):
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-5)


def test_batch_renorm_keeps_its_biased_form():
    model = net(bn_ext.nn.BatchRenorm2d)
    data = batches()
    # With r, d from the initial running statistics the first layer's output
    # is not plain BatchNorm's, so only the first layer has a closed form.
    (mean, var), _ = pooled_reference(model, data, biased=True)
    bn_ext.recalibrate_batch_norm(model, data)
    torch.testing.assert_close(model[1].running_mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[1].running_var.double(), var, rtol=1e-5, atol=1e-5)


def test_modes_momenta_and_counters_are_restored_and_dropout_stays_off():
    model = net(bn_ext.nn.BatchNorm2d)
    model[5].momentum = None
    model.train()
    model[3].eval()  # a mixed set of modes to restore
    with torch.no_grad():
        model[1].num_batches_tracked.fill_(7)
    modes = [m.training for m in model.modules()]
    data = batches()
    bn_ext.recalibrate_batch_norm(model, data)
    assert [m.training for m in model.modules()] == modes
    assert model[1].momentum == 0.1 and model[5].momentum is None
    assert model[1].num_batches_tracked.item() == 7 and model[5].num_batches_tracked.item() == 0
    # Dropout did not run: a second recalibration gives the same statistics.
    first = [t.clone() for t in (model[1].running_var, model[5].running_var)]
    bn_ext.recalibrate_batch_norm(model, data)
    assert all(torch.equal(a, b) for a, b in zip(first, (model[1].running_var, model[5].running_var)))


def test_differs_from_update_bn_which_averages_per_batch():
    from torch.optim.swa_utils import update_bn

    model = net()
    model[3] = torch.nn.Identity()
    data = batches()
    ours = copy.deepcopy(model)
    bn_ext.recalibrate_batch_norm(ours, data)
    update_bn(data, model)
    expected = pooled_reference(ours, data)[0][1]
    ours_error = (ours[1].running_var.double() - expected).abs().max()
    theirs_error = (model[1].running_var.double() - expected).abs().max()
    assert ours_error < 1e-5 < theirs_error


def test_batch_forms_num_batches_device_and_progress():
    data = batches()
    reference = net()
    bn_ext.recalibrate_batch_norm(reference, data[:2])
    for form in ([(x, torch.zeros(len(x))) for x in data], [[x] for x in data]):
        model = net()
        bn_ext.recalibrate_batch_norm(model, iter(form), num_batches=2, device="cpu", progress=True)
        assert torch.equal(model[1].running_var, reference[1].running_var)

    class Keyword(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = net()

        def forward(self, *, image):
            return self.body(image)

    model = Keyword()
    bn_ext.recalibrate_batch_norm(model, [{"image": x} for x in data[:2]])
    assert torch.equal(model.body[1].running_var, reference[1].running_var)


def test_layers_that_see_nothing_keep_their_statistics_and_are_named():
    class Branch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)

        def forward(self, x):
            return self.used(x)

    model = Branch()
    with pytest.warns(UserWarning, match="unused"):
        bn_ext.recalibrate_batch_norm(model, [torch.randn(4, 3)])
    assert torch.equal(model.unused.running_var, torch.ones(3))
    assert not torch.equal(model.used.running_var, torch.ones(3))


def _worker(rank, world, port, out_dir):
    try:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
        torch.set_num_threads(1)
        model = bn_ext.nn.SyncBatchNorm.convert_sync_batchnorm(net())
        sizes = [[2, 7, 4], [1, 5, 3]][rank]  # batches of different sizes on each process
        bn_ext.recalibrate_batch_norm(model, batches(sizes, seed=10 + rank))
        torch.save({"mean": model[1].running_mean, "var": model[1].running_var}, os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        raise


@pytest.mark.processes
def test_sync_batch_norm_pools_across_processes(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    errors = [f.read_text() for f in tmp_path.glob("*.error")]
    assert not errors, "\n".join(errors)
    assert all(p.exitcode == 0 for p in procs)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    # The first layer's input does not depend on the normalisation: its pooled
    # statistics over both processes' batches have a closed form.
    conv = net()[0]
    with torch.no_grad():
        values = torch.cat([conv(x) for x in batches([2, 7, 4], seed=10) + batches([1, 5, 3], seed=11)]).double()
    mean, var = values.mean([0, 2, 3]), values.var([0, 2, 3])
    for result in results:
        torch.testing.assert_close(result["mean"].double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result["var"].double(), var, rtol=1e-5, atol=1e-5)
