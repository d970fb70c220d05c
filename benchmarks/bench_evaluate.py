"""Time the evaluation protocol on the MNIST test set for a small VAE (CPU by default).

    python benchmarks/bench_evaluate.py [--data-dir ../shared/datasets] [--device cpu] [--ks 10 100 1000]

Prints seconds per 1,000 test images for nll_iw at several k, the whole protocol (ELBO, IWAE,
reconstruction, KL, active units, clustering) on the 10,000 test images, and the speed-up of our
batched, chunked IWAE over a naive per-image loop measured in the same run (the baseline), and
the Bernoulli likelihood the IWAE runs k times per image: PyTorch's fused BCE vs vaebench's
no-grad formula (`losses.bernoulli_nll`), same logits, with their largest difference.
The model is a freshly initialised vae/mlp (784-400-16): evaluation cost does not depend on training.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import device_and_data

from vaebench.batches import to_device
from vaebench.config import EvaluateSettings, RunSettings
from vaebench.evaluate import evaluate, iw_nll, log_normal_diag, log_normal_std
from vaebench.losses import bernoulli_nll, recon_nll
from vaebench.train import build_for

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def naive_iw_nll(model, x, settings, k: int) -> torch.Tensor:
    """Baseline: one image at a time, one sample at a time (what a blog-post loop does)."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        post = model.encode(xi)
        log_w = []
        for _ in range(k):
            z = post.mean + torch.exp(0.5 * post.logvar) * torch.randn_like(post.mean)
            log_w.append(-recon_nll(model.decode(z), xi, settings.likelihood)
                         + log_normal_std(z) - log_normal_diag(z, post.mean, post.logvar))
        out.append(-(torch.logsumexp(torch.cat(log_w), 0) - math.log(k)))
    return torch.stack(out)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--dataset", default="mnist", help="mnist (needs the files) or mnist5k (embedded)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--ks", type=int, nargs="+", default=[10, 100, 1000])
    args = p.parse_args()

    device, data = device_and_data(p, args)
    s = RunSettings(dataset=args.dataset, model="vae", latent_dim=16, arch_options={"mlp": {"hidden": [400]}},
                    device=args.device)
    torch.manual_seed(0)
    model = build_for(s, data.shape).to(device).eval()
    test = to_device(data.test, device, image_size=None, binarization="none")
    train = to_device(data.train, device, image_size=None, binarization="none")
    x = test.batch(torch.arange(1000, device=device))
    print(f"dataset {args.dataset}: {len(test)} test images, device {device}, torch threads {torch.get_num_threads()}")

    print("\nnll_iw, seconds per 1,000 images:")
    for k in args.ks:
        sec = timed(lambda: iw_nll(model, x, s, k))
        print(f"  k={k:<6d} {sec:8.2f} s   ({sec / k * 1000:.2f} ms per sample per 1,000 images)")

    # the likelihood the IWAE estimate evaluates k times per image: PyTorch's fused BCE (its
    # log_sigmoid) vs vaebench's no-grad formula (losses.bernoulli_nll), on one chunk of decodes
    logits = torch.randn(50_000, 784, device=device) * 4
    target = (torch.rand(50_000, 784, device=device) > 0.5).float()
    fused = lambda: F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # noqa: E731
    ours = lambda: bernoulli_nll(logits, target)  # noqa: E731
    fused(), ours()
    t_fused, t_ours = min(timed(fused) for _ in range(3)), min(timed(ours) for _ in range(3))
    gap = (fused().sum(1) - ours().sum(1)).abs().max().item()
    print(f"\nBernoulli NLL of 50,000 x 784 logits: fused BCE {t_fused * 1000:.0f} ms, "
          f"vaebench {t_ours * 1000:.0f} ms -> x{t_fused / t_ours:.2f}; largest per-image difference {gap:.1e} nats")

    n, k = 20, 100
    naive = timed(lambda: naive_iw_nll(model, x[:n], s, k))
    ours = timed(lambda: iw_nll(model, x[:n], s, k))
    print(f"\nbaseline, k={k} on {n} images: naive per-image loop {naive:.2f} s, batched {ours:.3f} s "
          f"-> speed-up x{naive / ours:.0f}")

    for k in (100, 1000):
        protocol = EvaluateSettings(iw_samples=k)
        sec = timed(lambda: evaluate(model, test, s, protocol, train=train, num_classes=data.num_classes))
        print(f"whole protocol on {len(test)} test images (k={k}, clustering on): {sec:.1f} s")


if __name__ == "__main__":
    main()
