"""How far apart two trainings of one cell end when they differ only by float rounding.

Packed and unpacked training compute the same thing with different kernels (a batched matmul for
8 members vs a plain one for 1), so on a GPU their results differ in the last bits of every step.
On the CPU vaebench's packed path equals the plain loop to float precision (tests/test_packed.py);
what the GPU comparison in bench_gpu.py measures is how much training amplifies last-bit
differences. This script measures that amplification directly, with no packing at all:

  1. train the cell for one epoch with the plain loop and keep its checkpoint (`--from init`: the
     checkpoint of no epoch at all, the initial weights, optimiser and random streams);
  2. resume it unchanged for the remaining epochs (the reference twin: on the CPU the same run,
     bit for bit, as training straight through);
  3. resume it again after multiplying every parameter by (1 + u * 2^-23), u uniform in [-1, 1]
     (about one unit in the last place of fp32), once per perturbation seed;
  4. evaluate every twin with the same protocol and seed, and print |test/elbo - reference|;
  5. resume it once more packed beside `--pack-size` - 1 siblings (other seeds; the batched kernels
     of a pack) and say whether its parameters come out bit-identical to the plain loop's.

The first epoch is where a high-beta model settles which latent dimensions stay active, so twins
that branch there (`--from init`) can end further apart than twins that branch after it.

    python benchmarks/bench_twins.py                          # the 32-cell study's two worst cells
    python benchmarks/bench_twins.py --latent 16 --beta 4 --twins 5
    python benchmarks/bench_twins.py --device cuda --iw-samples 1000 --test-samples 10000   # as bench_gpu.py
    python benchmarks/bench_twins.py --device cuda --iw-samples 1000 --test-samples 10000 --latent 16 --beta 4 \
        --from init --pack-size 8     # as a pack of the study trains its members: from the first step, K=8

The spread is the floor under any "packed within N nats of unpacked" check: an engine that does
not reproduce the plain loop bit for bit cannot be held closer than this.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch


def cell(args: argparse.Namespace, latent: int, beta: float):
    from vaebench.config import RunSettings

    return RunSettings(dataset=args.dataset, model="vae", arch="mlp", arch_options={"mlp": {"hidden": [400, 400]}},
                       latent_dim=latent, beta=beta, reduction="sum", batch_size=128, epochs=args.epochs,
                       device=args.device, max_train_samples=args.max_train)


def perturbed(checkpoint: dict, seed: int) -> dict:
    out = copy.deepcopy(checkpoint)
    gen = torch.Generator().manual_seed(seed)
    for name, value in out["model"].items():
        if value.is_floating_point():
            u = torch.rand(value.shape, generator=gen, dtype=value.dtype) * 2 - 1
            out["model"][name] = value * (1 + u * 2.0 ** -23)
    return out


def test_elbo(result, settings, data, protocol) -> float:
    from vaebench.batches import to_device
    from vaebench.evaluate import evaluate

    test = to_device(data.test, result.device, image_size=settings.image_size,
                     binarization=settings.binarization)
    return evaluate(result.model, test, settings, protocol).metrics["elbo"]


def twins(args: argparse.Namespace, latent: int, beta: float, data, protocol) -> list[str]:
    from vaebench.train import initial_checkpoint, train

    settings = cell(args, latent, beta)
    first: dict = {}
    if args.branch == "init":
        first = initial_checkpoint(settings, data)
    else:
        train(settings.model_copy(update={"epochs": 1}), data, progress=False,
              on_epoch_end=lambda epoch, metrics, ckpt: first.update(ckpt))
    t0 = time.perf_counter()
    plain = train(settings, data, resume=first, progress=False)  # train and train_packed leave `first` as it is
    reference = test_elbo(plain, settings, data, protocol)
    seconds = time.perf_counter() - t0
    trained = [train(settings, data, resume=perturbed(first, seed), progress=False) for seed in range(1, args.twins + 1)]
    others = [test_elbo(t, settings, data, protocol) for t in trained]
    gaps = [abs(e - reference) for e in others]
    # the evaluated weights are each twin's best epoch by validation loss: twins that pick
    # different epochs are a whole epoch of training apart, whatever the rounding
    lines = [f"vae-mlp-z{latent}-b{beta:g}-sum ({args.epochs} epochs, branched {WHERE[args.branch]}, "
             f"{seconds:.0f} s a twin): reference test/elbo "
             f"{reference:.2f}; perturbed twins " + ", ".join(f"{e:.2f}" for e in others)
             + f"; |gap| max {max(gaps):.2f}, mean {sum(gaps) / len(gaps):.2f} nats; best epochs: reference "
             f"{plain.best_epoch}, twins " + ", ".join(str(t.best_epoch) for t in trained)]
    if args.branch == "init":  # the construction of the initial checkpoint is right only if this holds
        straight = train(settings, data, progress=False)
        same = all(torch.equal(a, b) for a, b in zip(straight.model.state_dict().values(),
                                                     plain.model.state_dict().values()))
        lines.append(f"  the reference is {'bit for bit' if same else 'NOT bit for bit'} the run trained "
                     f"straight through")
    if args.packed:
        lines.append(packed_twin(settings, data, first, plain, reference, protocol, args.pack_size))
    return lines


WHERE = {"epoch1": "after epoch 1", "init": "at initialisation"}


def packed_twin(settings, data, first: dict, plain, reference: float, protocol, size: int) -> str:
    """The same resumed cell trained packed beside `size` - 1 siblings (other seeds): batched
    kernels, as on a GPU; on the CPU they may or may not round as the plain loop's do."""
    from vaebench.packed import train_packed

    siblings = [settings.model_copy(update={"seed": settings.seed + i}) for i in range(1, size)]
    result, *_ = train_packed([settings, *siblings], data, resumes=[first] + [None] * len(siblings), progress=False)
    if isinstance(result, Exception):
        raise result
    where = "captured" if result.how.get("vaebench.step") == "cuda-graph" else "eager"
    same = all(torch.equal(a, b) for a, b in zip(result.model.state_dict().values(), plain.model.state_dict().values()))
    elbo = test_elbo(result, settings, data, protocol)
    return (f"  packed beside {'a sibling' if size == 2 else f'{size - 1} siblings'} (K={size}, {settings.device}, "
            f"{where}): test/elbo {elbo:.2f}, "
            f"|gap| {abs(elbo - reference):.2f} nats "
            f"(best epoch {result.best_epoch}); parameters {'bit-identical to' if same else 'not bit-identical to'} "
            f"the plain loop's")


def main() -> None:
    from vaebench.config import EvaluateSettings
    from vaebench.train import dataset_for

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (every twin on the same device)")
    p.add_argument("--data-dir", default=os.environ.get("VAEBENCH_DATA_DIR", "data"))
    p.add_argument("--epochs", type=int, default=10, help="epochs per twin, as in bench_gpu.py's matrix")
    p.add_argument("--max-train", type=int, default=None, help="train on the first N images (default: all)")
    p.add_argument("--twins", type=int, default=3, help="perturbed twins per cell")
    p.add_argument("--latent", type=int, nargs="*", default=[16, 2])
    p.add_argument("--beta", type=float, nargs="*", default=[4.0, 1.0])
    p.add_argument("--iw-samples", type=int, default=100)
    p.add_argument("--no-packed", dest="packed", action="store_false",
                   help="leave out the twin trained packed beside its siblings")
    p.add_argument("--pack-size", type=int, default=2, help="the packed twin's K (itself and K-1 siblings)")
    p.add_argument("--from", dest="branch", choices=list(WHERE), default="epoch1",
                   help="where the twins branch: after the first epoch (default) or at initialisation")
    p.add_argument("--test-samples", type=int, default=2000, help="evaluate on the first N test images")
    args = p.parse_args()
    if len(args.latent) != len(args.beta):
        p.error("--latent and --beta pair up: give as many of each")
    if args.pack_size < 2:
        p.error("--pack-size: at least 2 (the twin and a sibling)")
    protocol = EvaluateSettings(iw_samples=args.iw_samples, max_test_samples=args.test_samples,
                                clustering=False, figures=False)
    data = dataset_for(cell(args, args.latent[0], args.beta[0]), args.data_dir)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; evaluation k={args.iw_samples} "
          f"on {args.test_samples} test images, the same seed for every twin")
    for latent, beta in zip(args.latent, args.beta):
        for line in twins(args, latent, beta, data, protocol):
            print(line, flush=True)


if __name__ == "__main__":
    main()
