"""Train a small model on CPU with bn_ext SyncBatchNorm across processes.

    torchrun --nproc-per-node 2 examples/train_sync_batchnorm.py
"""

import torch
import torch.distributed as dist

import bn_ext


def main(steps: int = 10) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10),
    )
    model = bn_ext.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(dist.get_rank())
    for step in range(steps):
        x = torch.randn(8, 3, 32, 32, generator=generator)
        y = torch.randint(0, 10, (8,), generator=generator)
        loss = torch.nn.functional.cross_entropy(ddp(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if dist.get_rank() == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    # Every rank done before any tears down: a rank whose peer has already
    # closed its gloo connections can abort at exit.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
