"""The evaluation protocol of a conv VAE with its convolutions channels-first vs channels-last.

    python benchmarks/bench_layout.py                         # CPU, 1 thread: conv and deep_conv on MNIST
    python benchmarks/bench_layout.py --device cuda --test-samples 10000 --iw-samples 1000

The evaluation of a conv model is its decoder run on k x N latent draws (the IWAE estimate), so its
speed is the speed of the transposed convolutions. `vaebench.evaluate` runs them channels-last
(NHWC) on the devices listed in `evaluate.CHANNELS_LAST`; this script measures both layouts in the
same run, same weights, same draws, so that the list is a measured choice and not a guess:

  for each architecture: seconds of `evaluate()` (clustering off) channels-first, then
  channels-last, alternating `--repeats` times; the ratio of the medians; and the largest
  difference of nll_iw, elbo and recon_mse between the two layouts (0 where the kernels
  round alike). On CUDA each layout is also timed with cuDNN's autotuner (`cudnn.benchmark`).

The model is freshly initialised: evaluation cost does not depend on training.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from common import device_and_data

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
ARCHS = {  # architecture -> its options: bench_gpu.py's conv VAE, and deep_conv as it comes
    "conv": {"conv": {"channels": [32, 64]}},
    "deep_conv": {},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("VAEBENCH_DATA_DIR", str(DEFAULT_DATA)))
    p.add_argument("--dataset", default="mnist", help="mnist (needs the files), mnist5k or digits (embedded)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--iw-samples", type=int, default=100)
    p.add_argument("--test-samples", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the development machine's measure: 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from vaebench.batches import to_device
    from vaebench.config import EvaluateSettings, RunSettings
    from vaebench.evaluate import evaluate
    from vaebench.train import build_for

    device, data = device_and_data(p, args)
    protocol = EvaluateSettings(iw_samples=args.iw_samples, max_test_samples=args.test_samples, clustering=False)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} thread(s)"
    print(f"device: {name}; torch {torch.__version__}; {args.dataset}, {min(args.test_samples, len(data.test))} "
          f"test images, k={args.iw_samples}")
    variants = ["channels-first", "channels-last"]
    if device.type == "cuda":
        variants += [f"{v} + cudnn.benchmark" for v in variants]
    for arch in args.archs:
        s = RunSettings(dataset=args.dataset, model="vae", arch=arch, arch_options=ARCHS[arch], latent_dim=16,
                        device=args.device)
        test = to_device(data.test, device, image_size=s.image_size, binarization=s.binarization)
        torch.manual_seed(0)
        weights = build_for(s, test.shape).state_dict()
        seconds: dict[str, list[float]] = {v: [] for v in variants}
        metrics: dict[str, dict[str, float]] = {}
        # one batch of images and one chunk of samples: every shape of the timed passes (evaluate's
        # batch of 500, the IWAE's chunk of iw_chunk decodes), so cuDNN's autotuner has timed them all
        # before the clock starts, as it has in a study after its first conv cell
        warm_up = protocol.model_copy(update={"max_test_samples": min(500, args.test_samples),
                                              "iw_samples": min(args.iw_samples, max(1, protocol.iw_chunk // 500))})
        for repeat in range(-1, args.repeats):  # -1: an untimed pass (CUDA's and cuDNN's first calls)
            for v in variants:
                model = build_for(s, test.shape)
                model.load_state_dict(weights)
                model.to(device)
                torch.backends.cudnn.benchmark = v.endswith("benchmark")
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                ev = evaluate(model, test, s, protocol if repeat >= 0 else warm_up, channels_last=v.startswith("channels-last"))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if repeat < 0:
                    continue
                seconds[v].append(time.perf_counter() - t0)
                metrics[v] = ev.metrics
        base = statistics.median(seconds[variants[0]])
        print(f"\n{arch}:")
        for v in variants:
            med = statistics.median(seconds[v])
            gap = max(abs(metrics[v][m] - metrics[variants[0]][m]) for m in ("nll_iw", "elbo", "recon_mse"))
            print(f"  {v:<34s} {med:8.3f} s  x{base / med:.2f}   max |metric difference| {gap:.2e}   "
                  f"nll_iw {metrics[v]['nll_iw']:.4f}")
    torch.backends.cudnn.benchmark = False


if __name__ == "__main__":
    main()
