"""Training throughput: vaebench's in-memory batching vs a torch DataLoader (the baseline).

    python benchmarks/bench_train.py [--dataset mnist5k] [--epochs 2] [--device cpu]

vaebench loads a dataset once into uint8 tensors on the training device and slices batches out
of them (normalise / resize / binarize on the fly). The baseline is the usual blog-post pipeline:
a float TensorDataset behind a DataLoader (shuffle, default collate). Same model, same optimiser,
same number of steps, measured in the same run; the ratio is what matters, not the seconds.
"""

from __future__ import annotations

import argparse
import time

import torch

from vaebench.config import RunSettings
from vaebench.data import load_dataset
from vaebench.losses import objective
from vaebench.train import build_for, resolve_device, train


def dataloader_baseline(s: RunSettings, data, device: torch.device) -> float:
    torch.manual_seed(s.seed)
    x = data.train.x.float().div(255.0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, data.train.y),
                                         batch_size=s.batch_size, shuffle=True)
    model = build_for(s, data.shape).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    t0 = time.perf_counter()
    for _ in range(s.epochs):
        for xb, _ in loader:
            xb = xb.to(device)
            out = model(xb)
            loss = objective(out.logits, xb, out.posterior.mean, out.posterior.logvar, likelihood="bernoulli",
                             reduction="sum", beta=1.0).loss.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    data = load_dataset(args.dataset, args.data_dir)
    device = resolve_device(args.device)
    print(f"{args.dataset}: {len(data.train)} training images, device {device}, {args.epochs} epochs")
    for arch, options in (("mlp", {"hidden": [512]}), ("conv", {"channels": [32, 64]})):
        s = RunSettings(dataset=args.dataset, model="vae", arch=arch, arch_options={arch: options},
                        latent_dim=16, epochs=args.epochs, batch_size=args.batch_size, device=args.device)
        # best of 3, interleaved, so warm-up and background load hit both sides alike
        base, ours = float("inf"), float("inf")
        for _ in range(3):
            base = min(base, dataloader_baseline(s, data, device))
            ours = min(ours, train(s, data, progress=False).train_seconds)  # incl. per-epoch validation
        print(f"  vae/{arch}: DataLoader baseline {base:.2f} s, vaebench {ours:.2f} s (incl. validation) "
              f"-> ratio {base / ours:.2f}x")


if __name__ == "__main__":
    main()
