"""A dataset attribution job for tests/test_distributed.py, run as ``python`` or under ``torchrun``.

usage: _dataset_job.py OUT [--delay SECONDS] [--pid-dir DIR] [--method ig|smoothgrad] [--perturb-rank R]

``--perturb-rank R``: rank R changes one weight (as if it had not loaded the checkpoint).
"""

import argparse
import os
import time

import torch
from torch import nn

import attrax as ax


def model_and_data(n: int = 200):
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 2 * 2, 5)
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x = torch.randn(n, 1, 8, 8, generator=g)
    t = torch.randint(0, 5, (n,), generator=g)
    return net.eval(), torch.utils.data.TensorDataset(x, t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--pid-dir")
    ap.add_argument("--method", default="ig")
    ap.add_argument("--perturb-rank", type=int)
    args = ap.parse_args()
    if args.pid_dir:
        with open(os.path.join(args.pid_dir, f"rank-{os.environ.get('RANK', '0')}.pid"), "w") as f:
            f.write(str(os.getpid()))
    net, ds = model_and_data()
    if args.perturb_rank == int(os.environ.get("RANK", "0")):
        with torch.no_grad():
            net[0].bias[0] += 1e-3
    model_fn, params = ax.functionalize(net)
    if args.method == "ig":
        method, kw = ax.integrated_gradients, {"n_steps": 16}
    else:
        method, kw = ax.smoothgrad, {"n_samples": 4, "stdev": 0.1, "seed": 7}

    def slow(*a, **k):
        time.sleep(args.delay)
        return method(*a, **k)

    slow.__qualname__ = method.__qualname__  # same manifest as the undelayed run
    slow.__module__ = method.__module__
    ax.distributed.attribute_dataset(slow, model_fn, params, ds, out=args.out, batch_size=10, shard_size=20, progress=False, **kw)


if __name__ == "__main__":
    main()
