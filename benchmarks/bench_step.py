"""Kernels per packed training step, and their cost: the optimiser's update over one flat buffer
(vaebench.packed.StackedAdam) vs the same update once per parameter (the baseline: how the packed
engine updated before the flat layout, kept here).

A packed step of small models is bound by how many kernels it launches, not by their arithmetic:
on an H100 even a kernel replayed from a CUDA graph costs a few microseconds, and an MLP VAE's
step at 8 members does about 6 GFLOP, a tenth of a millisecond of arithmetic. Adam touches every
parameter tensor some ten times, so once per parameter it is most of a step's kernels.

For each architecture and pack size, both updates are measured in the same run, interleaved:

  kernels   CUDA: the kernels one step launches (torch.profiler, eager step). CPU: a proxy, the
            aten operators a step dispatches, leaving out views, allocations and those that only
            call others; the CPU also casts 0-dim scalars where CUDA passes them to the kernel,
            so the proxy is higher than the CUDA count, alike for both updates. `update` is the
            optimiser's update alone, counted the same way
  seconds   per step (one step = the members' noise draws + the step), the mean of `--steps`
            steps run back to back, best of 3 rounds; replayed from a CUDA graph on CUDA (what
            `compile: auto` does)
  autotuned CUDA, conv: the flat step again with cuDNN's autotuner on while it is built
            (`torch.backends.cudnn.benchmark`: each conv's algorithms are timed in the eager runs
            before the capture, and the graph keeps the fastest), ms per step and its speed-up over
            the flat step as vaebench builds it (autotuner off)

    python benchmarks/bench_step.py                                    # CPU, mnist5k
    python benchmarks/bench_step.py --device cuda --dataset mnist      # a GPU: what it is for
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from common import device_and_data

# aten operators that launch no kernel: views, shape queries, allocations (a `zeros` shows up as
# its `zero_` leaf, which does)
NO_KERNEL = {"view", "reshape", "_reshape_alias", "transpose", "t", "select", "unsqueeze", "squeeze", "expand",
             "as_strided", "slice", "permute", "detach", "alias", "_unsafe_view", "empty", "empty_strided",
             "empty_like", "lift_fresh", "resolve_conj", "resolve_neg", "split", "unbind", "chunk", "narrow",
             "view_as", "expand_as", "result_type", "size", "stride", "numel", "dim", "set_", "_local_scalar_dense",
             "item", "is_nonzero", "movedim", "unflatten", "flatten", "split_with_sizes", "_has_compatible_shallow_copy_type"}
# aten operators that only call others (which are counted): the same on the CPU and CUDA
COMPOSITE = {"to", "_to_copy", "linear", "matmul", "clone", "contiguous", "zeros", "zeros_like", "ones_like",
             "new_zeros", "full", "full_like", "mean", "stack", "log_sigmoid", "binary_cross_entropy_with_logits"}


@torch.no_grad()
def per_parameter_update(adam, grads: list[torch.Tensor]) -> None:
    """The baseline: StackedAdam's update as the packed engine did it before the flat buffer, each
    element-wise operation issued once per parameter tensor (the same arithmetic); bound onto a
    StackedAdam in place of its own."""
    from vaebench.packed import ADAM_BETAS, ADAM_EPS

    b1, b2 = ADAM_BETAS
    adam.step += 1
    step_size = (adam.lr / (1 - b1 ** adam.step)).float()
    bc2_sqrt = (1 - b2 ** adam.step).sqrt().float()
    lr = adam.lr.float()
    l2, decay = adam.l2.squeeze(1), adam.decay.squeeze(1)
    for p, g, (m, v) in zip(adam.params, grads, adam.moments()):
        view = (-1,) + (1,) * (p.ndim - 1)
        g = g + l2.view(view) * p
        p.mul_(1 - (lr * decay).view(view))
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / bc2_sqrt.view(view)).add_(ADAM_EPS)
        p.sub_(step_size.view(view) * m / denom)


def build(args: argparse.Namespace, data, arch: str, members: int, flavour: str):
    """A pack of `members` cells differing in beta, and its step for full batches."""
    import types

    from vaebench.config import RunSettings
    from vaebench.packed import Pack, Step
    from vaebench.train import resolve_device, splits_for

    options = {"mlp": {"hidden": [400, 400]}, "conv": {"channels": [32, 64]}, "tiny": {"hidden": [32]}}[arch]
    cells = [RunSettings(dataset=args.dataset, model="vae", arch="mlp" if arch == "tiny" else arch,
                         arch_options={"mlp" if arch == "tiny" else arch: options}, latent_dim=20,
                         beta=1.0 + 0.5 * i, epochs=1, batch_size=args.batch_size, device=args.device, seed=i)
             for i in range(members)]
    device = resolve_device(args.device)
    train_split, _ = splits_for(cells[0], data, device)
    pack = Pack(cells, train_split.shape, device, [None] * members, len(train_split))
    if flavour == "per-parameter":
        pack.optimizer.update = types.MethodType(per_parameter_update, pack.optimizer)
    sums = torch.zeros(members, 3, device=device)
    capture = device.type == "cuda"
    dynamic = train_split.binarization == "dynamic" and not train_split.binary
    step = Step(pack, train_split, args.batch_size, sums, dynamic=dynamic, capture=capture)
    gen = torch.Generator(device="cpu").manual_seed(0)
    step.index.copy_(torch.randint(0, len(train_split), (members, args.batch_size), generator=gen))
    return pack, step


def kernels(pack, step, device: torch.device) -> tuple[int, int]:
    """Kernels of one eager step: (the whole step with its draws, the optimiser update alone)."""
    from torch.profiler import ProfilerActivity, profile

    def count(fn) -> int:
        cuda = device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            fn()
            if cuda:
                torch.cuda.synchronize()
        events = prof.events()
        if cuda:
            return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        names = [e.name.removeprefix("aten::") for e in events if e.name.startswith("aten::")]
        return sum(1 for name in names if name not in NO_KERNEL and name not in COMPOSITE)

    grads = [torch.zeros_like(p) for p in pack.params.values()]

    def eager() -> None:
        step.draw()
        step._run()

    eager()  # lazy initialisations out of the count
    return count(eager), count(lambda: pack.optimizer.update(grads))


def seconds_per_step(step, device: torch.device, n: int) -> float:
    """The mean of n steps run back to back, as an epoch runs them (on CUDA the host queues the
    next step while the device runs this one: one synchronisation at the end)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step.draw()
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--data-dir", default=os.environ.get("VAEBENCH_DATA_DIR", "./data"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--arch", nargs="+", default=["tiny", "mlp", "conv"], choices=["tiny", "mlp", "conv"],
                   help="tiny: an MLP VAE 784-32-20 (overhead only); mlp: 784-400-400-20; conv: (32, 64)")
    p.add_argument("--members", type=int, nargs="+", default=[1, 8],
                   help="pack sizes (add 32 on a GPU; on the CPU a 32-member step takes seconds)")
    p.add_argument("--steps", type=int, default=20, help="steps timed per round")
    args = p.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)  # per-operator overhead, undisturbed by thread start-ups

    device, data = device_and_data(p, args, download=True)
    what = "CUDA kernels" if device.type == "cuda" else "aten ops (the kernel count's CPU proxy)"
    step_kind = "captured step (CUDA graph)" if device.type == "cuda" else "eager step, 1 thread"
    print(f"{args.dataset}, batch {args.batch_size}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}; "
          f"{what} per step; seconds per {step_kind}")
    print(f"{'arch':<5} {'K':>3}  {'kernels: per-param':>18} {'flat':>6} {'ratio':>6}   "
          f"{'update: per-param':>17} {'flat':>5}   {'ms/step: per-param':>18} {'flat':>7} {'speed-up':>8}   "
          f"{'autotuned':>9} {'speed-up':>8}")
    for arch in args.arch:
        for k in args.members:
            built = {f: build(args, data, arch, k, f) for f in ("per-parameter", "flat")}
            counts = {f: kernels(*built[f], device) for f in built}
            if device.type == "cuda" and arch == "conv":  # built last: the autotuner off for the others
                torch.backends.cudnn.benchmark = True
                try:
                    built["autotuned"] = build(args, data, arch, k, "flat")
                finally:
                    torch.backends.cudnn.benchmark = False
            best = {f: float("inf") for f in built}
            for _ in range(3):  # interleaved, so warm-up and background load hit them alike
                for f, (_, step) in built.items():
                    seconds_per_step(step, device, 3)
                    best[f] = min(best[f], seconds_per_step(step, device, args.steps))
            (base, base_update), (flat, flat_update) = counts["per-parameter"], counts["flat"]
            tuned = (f"{best['autotuned'] * 1e3:>9.2f} {best['flat'] / best['autotuned']:>7.2f}x"
                     if "autotuned" in best else f"{'-':>9} {'-':>8}")
            print(f"{arch:<5} {k:>3}  {base:>18} {flat:>6} {base / flat:>5.2f}x   {base_update:>17} {flat_update:>5}   "
                  f"{best['per-parameter'] * 1e3:>18.2f} {best['flat'] * 1e3:>7.2f} "
                  f"{best['per-parameter'] / best['flat']:>7.2f}x   {tuned}", flush=True)


if __name__ == "__main__":
    main()
