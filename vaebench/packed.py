"""The packed engine: a group of runs trained at once as one stacked model, its step captured once
in a CUDA graph and replayed.

A group ("pack") is runs that share everything that fixes the shapes of a step (dataset and its
preprocessing, family, architecture and its options, latent size, batch size, epochs; see
vaebench.plan). Their parameters, buffers (batch-norm statistics included) and optimiser state are
stacked along a leading member axis, and one `torch.func.vmap` of the per-model step of
vaebench.step trains them all. Everything else is each member's own: beta, reduction, likelihood,
KL annealing, lr and its schedule, weight decay, optimiser flavour, patience, noise factor, seed
(its own initialisation, shuffling and noise streams) and its family's scalar options (buffers of
the model, stacked with the rest; models.families). So a member trains exactly as it would alone,
to float precision (tests/test_packed.py checks it against vaebench.train.train).

Each member keeps its own `train.Record` (epochs, history, early stopping) and checkpoint, in the
plain loop's format, so either engine resumes what the other started. Members may start at
different epochs (a resumed group); a member that stops early, finishes or diverges leaves the
stack at the end of the epoch, and the rest go on.

The step: `compile: graphs` captures it (gather of the batch from the uint8 split on the device,
binarization, forward, backward, Adam) in a CUDA graph; per-step inputs (batch indices, KL weights,
the members' noise) are written into static buffers before each replay, from device tensors and
each member's own generator, so nothing waits for the host inside an epoch. Without CUDA the same
step runs eagerly (that is what the tests exercise on the CPU).

Like vaebench.train, this module knows nothing of MLflow: it reports through callbacks.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from vaebench.batches import DeviceSplit
from vaebench.config import RunSettings
from vaebench.data import Dataset
from vaebench.losses import LikelihoodMix, effective_beta, reduction_scale
from vaebench.models import AutoEncoder
from vaebench.step import VAL_SEED, Noise, Streams, draw_noise, fixed_log_sigma, loss_and_sums
from vaebench.train import (OPTIMIZERS, Record, TrainingDiverged, TrainResult, build_for, epoch_metrics, kl_weights,
                            lr_at, num_batches, resolve_device, splits_for, val_batch, val_metrics)

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam / AdamW defaults, which the plain loop uses
ADAM_EPS = 1e-8
WARMUP_STEPS = 2  # eager steps before a capture (lazy initialisations); their effects are undone
VAL_MEMBER_CHUNK = 8  # validation vmaps over at most this many members at once (bounds its memory)

# member index, epoch, metrics, checkpoint maker (called only when the caller wants one), and
# whether this was the member's last epoch
MemberEpochCallback = Callable[[int, int, dict[str, float], Callable[[], dict[str, Any]], bool], None]
# member index, its result, or the exception that failed it (TrainingDiverged)
MemberDoneCallback = Callable[[int, "TrainResult | Exception"], None]


def resolve_compile(setting: str, device: torch.device) -> str:
    """`auto` -> graphs on CUDA, off elsewhere; `graphs` without CUDA runs eagerly too (said in a tag)."""
    if setting == "auto":
        return "graphs" if device.type == "cuda" else "off"
    return setting


def captured(settings: RunSettings) -> bool:
    """Whether a run's step is captured, which this engine does (alone or packed); otherwise a
    lone run trains in the plain loop (vaebench.train)."""
    return resolve_compile(settings.compile, resolve_device(settings.device)) == "graphs"


# --- a vectorised Adam ---------------------------------------------------------------------------


def flat_views(flat: Tensor, shapes: list[torch.Size]) -> list[Tensor]:
    """Views (M, *shape) into a (M, P) buffer, one per shape, laid out one after the other."""
    views, start = [], 0
    for shape in shapes:
        n = math.prod(shape)
        views.append(flat[:, start:start + n].view(flat.shape[0], *shape))
        start += n
    return views


class StackedAdam:
    """Adam and AdamW (torch.optim's update, with its defaults) over parameters stacked along a
    leading member axis: each member has its own lr, weight decay and flavour (L2 in the gradient
    for `adam`, decoupled decay for `adamw`). All state lives on the device and the update issues
    no host synchronisation, so it can be captured in a CUDA graph.

    The parameters are copied into one (M, P) buffer that the optimiser owns; `params` are views of
    it, one per parameter. So an update is about ten element-wise kernels over that buffer whatever
    the number of parameters, not ten per parameter: a small model's step is bound by how many
    kernels it launches, not by their arithmetic (benchmarks/bench_step.py counts them)."""

    def __init__(self, params: list[Tensor], members: list[RunSettings]):
        device = params[0].device
        self.shapes = [p.shape[1:] for p in params]
        self.flat = torch.cat([p.detach().reshape(len(members), -1) for p in params], 1)  # (M, P)
        self.params = flat_views(self.flat, self.shapes)
        self.exp_avg = torch.zeros_like(self.flat)
        self.exp_avg_sq = torch.zeros_like(self.flat)
        self.step = torch.zeros(len(members), device=device, dtype=torch.float64)  # (M,)
        self.lr = torch.tensor([s.lr for s in members], device=device, dtype=torch.float64)
        wd = torch.tensor([s.weight_decay for s in members], device=device)
        decoupled = torch.tensor([s.optimizer == "adamw" for s in members], device=device)
        self.l2 = torch.where(decoupled, 0.0, wd).unsqueeze(1)  # (M, 1) added to the gradient (Adam)
        self.decay = torch.where(decoupled, wd, 0.0).unsqueeze(1)  # (M, 1) decoupled (AdamW)
        # kernels that would only add zeros are left out (a member that leaves keeps them in: still exact)
        self.uses_l2 = any(s.weight_decay and s.optimizer != "adamw" for s in members)
        self.uses_decay = any(s.weight_decay and s.optimizer == "adamw" for s in members)

    def state_tensors(self) -> list[Tensor]:
        """Every tensor an update changes in place (the parameters are views of `flat`)."""
        return [self.flat, self.exp_avg, self.exp_avg_sq, self.step]

    @torch.no_grad()
    def update(self, grads: list[Tensor]) -> None:
        b1, b2 = ADAM_BETAS
        self.step += 1
        # bias corrections in float64 like torch's (python floats there), then per-member factors
        step_size = (self.lr / (1 - b1 ** self.step)).float().unsqueeze(1)  # (M, 1)
        bc2_sqrt = (1 - b2 ** self.step).sqrt().float().unsqueeze(1)
        p, m, v = self.flat, self.exp_avg, self.exp_avg_sq
        g = torch.cat([g.reshape(len(p), -1) for g in grads], 1)  # (M, P), in the order of `flat`
        if self.uses_l2:
            g = g + self.l2 * p
        if self.uses_decay:
            p.mul_(1 - self.lr.float().unsqueeze(1) * self.decay)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = torch.sqrt(v).div_(bc2_sqrt).add_(ADAM_EPS)
        p.addcdiv_(step_size * m, denom, value=-1.0)

    def moments(self) -> list[tuple[Tensor, Tensor]]:
        """(exp_avg, exp_avg_sq) per parameter, (M, *shape) views of the flat moments."""
        return list(zip(flat_views(self.exp_avg, self.shapes), flat_views(self.exp_avg_sq, self.shapes)))

    def member_state(self, m: int, template: dict[str, Any]) -> dict[str, Any]:
        """Member m's state as torch.optim's `state_dict()` (`template`: that optimiser's empty one)."""
        out = copy.deepcopy(template)
        step = self.step[m].float().cpu()
        out["state"] = {i: {"step": step.clone(), "exp_avg": a[m].detach().cpu().clone(),
                            "exp_avg_sq": s[m].detach().cpu().clone()}
                        for i, (a, s) in enumerate(self.moments())}
        return out

    @torch.no_grad()
    def load_member_state(self, m: int, state: dict[str, Any]) -> None:
        """Load a torch.optim `state_dict()` into member m (moments of parameters it never stepped stay 0)."""
        for i, (a, s) in enumerate(self.moments()):
            if i in state["state"]:
                a[m].copy_(state["state"][i]["exp_avg"])
                s[m].copy_(state["state"][i]["exp_avg_sq"])
                self.step[m] = float(state["state"][i]["step"])

    def keep(self, index: Tensor) -> None:
        """Keep only the members at `index` (stack order); `params` are new views afterwards."""
        for name in ("flat", "exp_avg", "exp_avg_sq", "step", "lr", "l2", "decay"):
            setattr(self, name, getattr(self, name).index_select(0, index))
        self.params = flat_views(self.flat, self.shapes)


# --- the objective of one member, as a module for functional_call --------------------------------


class _Objective(nn.Module):
    """Wraps a model so that `functional_call` can swap in one member's parameters and buffers
    and run vaebench.step.loss_and_sums on them (vmap maps it over the members)."""

    def __init__(self, model: AutoEncoder, likelihoods: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.likelihoods = likelihoods

    def forward(self, x: Tensor, noise: Noise, recon_scale: Tensor, kl_coef: Tensor, log_sigma: Tensor,
                likelihood: Tensor) -> tuple[Tensor, Tensor]:
        lik = self.likelihoods[0] if len(self.likelihoods) == 1 else LikelihoodMix(self.likelihoods, likelihood)
        return loss_and_sums(self.model, x, noise, likelihood=lik, recon_scale=recon_scale, kl_coef=kl_coef,
                             log_sigma=log_sigma)


@dataclass
class Member:
    """One run of a pack, with everything that is its own."""

    settings: RunSettings
    streams: Streams
    record: Record
    optimizer_template: dict[str, Any]  # torch.optim's empty state_dict for this run (checkpoint format)
    index: int  # its position in the caller's list (callbacks use it), not in the stack


class Pack:
    """The stacked state of the members still training, and their per-member constants."""

    def __init__(self, members: list[RunSettings], shape: tuple[int, int, int], device: torch.device,
                 resumes: list[dict[str, Any] | None], n_train: int):
        from torch.func import stack_module_state

        models = []
        self.n_train = n_train
        self.members: list[Member] = []
        for i, (s, resume) in enumerate(zip(members, resumes)):
            torch.manual_seed(s.seed)  # the initialisation, exactly as the plain loop draws it
            model = build_for(s, shape)
            model.set_dataset_size(n_train)
            template = OPTIMIZERS[s.optimizer](model.parameters(), lr=s.lr, weight_decay=s.weight_decay).state_dict()
            streams = Streams(s.seed, device)
            record = Record()
            if resume is not None:
                model.load_state_dict(resume["model"])
                streams.set_state(resume["rng"])
                record = Record.from_checkpoint(resume)
            models.append(model.to(device))
            self.members.append(Member(s, streams, record, template, i))
        self.base = _Objective(copy.deepcopy(models[0]).to("meta"), tuple(dict.fromkeys(s.likelihood for s in members)))
        params, buffers = stack_module_state(models)
        self.buffers = dict(buffers)
        self.optimizer = StackedAdam(list(params.values()), members)
        self._params_from_optimizer(list(params))
        for m, resume in enumerate(resumes):
            if resume is not None:
                self.optimizer.load_member_state(m, resume["optimizer"])
        num_pixels = math.prod(shape)
        f32 = dict(device=device, dtype=torch.float32)
        self.recon_scale = torch.tensor([reduction_scale(s.reduction, num_pixels) for s in members], **f32)
        self.beta = torch.tensor([s.beta for s in members], **f32)
        # the fixed Gaussian log std-dev (0 where it does not apply: Bernoulli, or learned by the model)
        self.log_sigma = torch.tensor([math.log(s.gaussian_sigma) if fixed_log_sigma(s) is not None else 0.0
                                       for s in members], **f32)
        self.likelihood = torch.tensor([self.base.likelihoods.index(s.likelihood) for s in members], device=device)
        self.eff_beta = [effective_beta(s.beta, s.reduction, num_pixels) for s in members]

    def __len__(self) -> int:
        return len(self.members)

    @property
    def model(self) -> AutoEncoder:
        return self.base.model

    def _params_from_optimizer(self, names: list[str]) -> None:
        """The (M, ...) parameter leaves: the optimiser's views of its flat buffer."""
        self.params = {k: v.requires_grad_() for k, v in zip(names, self.optimizer.params)}

    def state_tensors(self) -> list[Tensor]:
        """Every tensor a training step changes in place (the parameters live in the optimiser's)."""
        return [*self.buffers.values(), *self.optimizer.state_tensors()]

    def prefixed(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return ({f"model.{k}": v for k, v in self.params.items()}, {f"model.{k}": v for k, v in self.buffers.items()})

    def losses(self, x: Tensor, noise: Noise, kl_weight: Tensor, *, shared_input: bool = False,
               chunk: int | None = None) -> tuple[Tensor, Tensor]:
        """Every member's batch loss (M,) and loss/recon/kl sums (M, 3). x and noise carry a leading
        member axis, or are the same for every member with `shared_input` (validation)."""
        from torch.func import functional_call, vmap

        params, buffers = self.prefixed()

        def one(p, b, x, noise, recon_scale, kl_coef, log_sigma, likelihood):
            return functional_call(self.base, (p, b), (x, noise, recon_scale, kl_coef, log_sigma, likelihood))

        data_dim = None if shared_input else 0
        noise_dims = Noise(*(None if t is None else data_dim for t in noise))  # vmap maps tensors only
        return vmap(one, in_dims=(0, 0, data_dim, noise_dims, 0, 0, 0, 0), chunk_size=chunk)(
            params, buffers, x, noise, self.recon_scale, self.beta * kl_weight, self.log_sigma, self.likelihood)

    def member_state_dict(self, m: int) -> dict[str, Tensor]:
        """Member m's weights and buffers on the CPU, keyed like the plain model's state_dict."""
        persistent = self.model.state_dict(keep_vars=True).keys()
        out = {k: v[m].detach().cpu().clone() for k, v in {**self.params, **self.buffers}.items() if k in persistent}
        return {k: out[k] for k in persistent}  # the plain model's order

    def checkpoint(self, m: int) -> dict[str, Any]:
        member = self.members[m]
        return {**member.record.checkpoint(), "model": self.member_state_dict(m),
                "optimizer": self.optimizer.member_state(m, member.optimizer_template),
                "rng": member.streams.get_state()}

    def keep(self, positions: list[int]) -> None:
        """Drop every member but those at `positions` (stack order)."""
        device = self.beta.device
        index = torch.tensor(positions, device=device, dtype=torch.long)
        with torch.no_grad():
            self.buffers = {k: v.index_select(0, index) for k, v in self.buffers.items()}
            self.optimizer.keep(index)
        self._params_from_optimizer(list(self.params))
        for name in ("recon_scale", "beta", "log_sigma", "likelihood"):
            setattr(self, name, getattr(self, name).index_select(0, index))
        self.eff_beta = [self.eff_beta[p] for p in positions]
        self.members = [self.members[p] for p in positions]


# --- the step -----------------------------------------------------------------------------------


class Step:
    """One training step of a pack on a batch of `batch` images per member: eager, or captured in
    a CUDA graph. Inputs live in static buffers (`index`, `kl_weight`, `noise`) that the caller
    fills before each call; the summed loss/recon/kl accumulate into `sums` (M, 3)."""

    def __init__(self, pack: Pack, split: DeviceSplit, batch: int, sums: Tensor, *, dynamic: bool,
                 capture: bool, pool: Any = None):
        device = pack.beta.device
        m = len(pack)
        self.pack, self.split, self.batch, self.sums = pack, split, batch, sums
        self.index = torch.zeros(m, batch, device=device, dtype=torch.long)
        self.kl_weight = torch.ones(m, device=device)
        shape = split.shape
        eps_shape = pack.model.eps_shape(batch)
        self.noise = Noise(
            torch.zeros(m, batch, *shape, device=device) if dynamic else None,
            torch.zeros(m, batch, *shape, device=device) if pack.model.denoising else None,
            torch.zeros(m, *eps_shape, device=device) if eps_shape is not None else None)
        self.graph = None
        if capture:
            self.graph = _capture(self._run, pack.state_tensors() + [sums], pool)

    def draw(self) -> None:
        """Each member's noise for the next step, from its own stream, into the static buffers."""
        for m, member in enumerate(self.pack.members):
            draw_noise(self.pack.model, member.streams.noise, self.batch, self.split.shape,
                       dynamic=self.noise.uniform is not None,
                       out=Noise(*(None if t is None else t[m] for t in self.noise)))

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run()

    def _run(self) -> None:
        pack, m, b = self.pack, len(self.pack), self.batch
        uniform = self.noise.uniform
        x = self.split.batch(self.index.reshape(-1), None if uniform is None else uniform.reshape(m * b, *uniform.shape[2:]))
        x = x.view(m, b, *x.shape[1:])  # (M, B, C, H, W)
        pack.model.train()
        losses, sums = pack.losses(x, Noise(None, self.noise.corrupt, self.noise.eps), self.kl_weight)
        grads = torch.autograd.grad(losses.sum(), list(pack.params.values()))
        pack.optimizer.update(list(grads))
        with torch.no_grad():
            self.sums += sums


def _capture(fn: Callable[[], None], state: list[Tensor], pool: Any) -> Any:
    """Capture `fn` in a CUDA graph. A few eager runs come first, on a side stream, as capture
    requires; they change `state` (parameters, optimiser moments, statistics), which is put back."""
    saved = [t.detach().clone() for t in state]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_STEPS):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.no_grad():
        for t, s in zip(state, saved):
            t.copy_(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph


# --- the loop -----------------------------------------------------------------------------------


def train_packed(members: list[RunSettings], data: Dataset, *, resumes: list[dict[str, Any] | None] | None = None,
                 on_epoch_end: MemberEpochCallback | None = None, on_done: MemberDoneCallback | None = None,
                 progress: bool = True, should_stop: Callable[[], bool] | None = None,
                 names: list[str] | None = None) -> list[TrainResult | Exception]:
    """Train `members` (runs of one pack: vaebench.plan.pack_key equal) together; returns, per
    member, its TrainResult or the exception that failed it. `resumes[i]` continues member i from
    its checkpoint. `on_epoch_end(i, epoch, metrics, make_checkpoint, final)` follows every epoch of
    every member; `on_done(i, result)` is called as soon as a member leaves the pack (finished, stopped
    early, diverged), so its evaluation can start while the others train. KeyboardInterrupt (from
    `should_stop`, polled before every step) propagates at a clean point."""
    from tqdm.auto import tqdm

    from vaebench.plan import pack_key

    first = members[0]
    if len({pack_key(s) for s in members}) > 1:
        raise ValueError("these runs cannot share a step: they differ in more than the per-member "
                         "settings (vaebench.plan.PER_MEMBER)")
    device = resolve_device(first.device)
    resumes = resumes or [None] * len(members)
    train_split, val_split = splits_for(first, data, device)
    shape = train_split.shape
    dynamic = train_split.binarization == "dynamic" and not train_split.binary
    pack = Pack(members, shape, device, resumes, len(train_split))
    wanted = resolve_compile(first.compile, device)
    how = {"vaebench.engine": "packed", "vaebench.pack.size": str(len(members))}
    if names:
        how["vaebench.pack.members"] = ",".join(names)
    if wanted == "graphs" and device.type != "cuda":
        how["vaebench.step.fallback"] = f"compile: graphs needs CUDA; ran eagerly on {device.type}"
    capture = wanted == "graphs" and device.type == "cuda"
    results: list[TrainResult | Exception | None] = [None] * len(members)

    def leave(position: int, outcome: TrainResult | Exception) -> None:
        results[pack.members[position].index] = outcome
        if on_done is not None:
            on_done(pack.members[position].index, outcome)

    # members resumed from a finished checkpoint (killed during evaluation) leave at once; nothing
    # was trained here, so their runs keep the tags of the attempt that trained them (no `how`)
    done = [p for p, mb in enumerate(pack.members) if mb.record.done(mb.settings)]
    for p in done:
        leave(p, _result(pack, p, device, {}))
    if done:
        pack.keep([p for p in range(len(pack)) if p not in done])

    n, batch = len(train_split), first.batch_size
    n_batches = num_batches(n, batch)
    sums = torch.zeros(len(pack), 3, device=device)
    steps: dict[int, Step] = {}
    total = max((mb.settings.epochs - mb.record.epoch - 1 for mb in pack.members), default=0)
    bar = tqdm(total=total, desc=f"epochs ({len(pack)} packed)", unit="ep", leave=False, disable=not progress)
    while len(pack):
        if not steps:  # (re)built for the current members: at the start and after one left
            sums = torch.zeros(len(pack), 3, device=device)
            steps, how = _build_steps(pack, train_split, batch, n, sums, dynamic, capture, how)
        t0 = time.perf_counter()
        epochs = [mb.record.epoch + 1 for mb in pack.members]
        weights = [kl_weights(mb.settings, e, n_batches) for mb, e in zip(pack.members, epochs)]
        table = torch.tensor(weights, device=device).T.contiguous()  # (n_batches + 1, M)
        # each member's lr for this epoch, in place: a captured step reads this very tensor
        pack.optimizer.lr.copy_(torch.tensor([lr_at(mb.settings, e) for mb, e in zip(pack.members, epochs)],
                                             dtype=torch.float64))
        perm = torch.stack([mb.streams.permutation(n, device) for mb in pack.members])  # (M, N)
        sums.zero_()
        for b in range(n_batches):
            if should_stop is not None and should_stop():
                raise KeyboardInterrupt("stop requested")
            index = perm[:, b * batch:(b + 1) * batch]
            step = steps[index.shape[1]]
            step.index.copy_(index)
            step.kl_weight.copy_(table[b])
            step.draw()
            step()
        epoch_sums = sums.tolist()  # the one synchronisation of an epoch
        val = _validate(pack, val_split)
        seconds = time.perf_counter() - t0
        leaving: list[tuple[int, TrainResult | Exception]] = []
        for p, mb in enumerate(pack.members):
            epoch = epochs[p]
            try:
                metrics = epoch_metrics(epoch_sums[p], n, weights[p][-1], pack.eff_beta[p], epoch, mb.settings)
            except TrainingDiverged as e:
                leaving.append((p, e))
                continue
            metrics.update(val[p])
            metrics["train/epoch_seconds"] = seconds
            if mb.record.end_epoch(epoch, metrics, seconds, mb.settings):
                mb.record.best_model = pack.member_state_dict(p)
            final = mb.record.done(mb.settings)
            if on_epoch_end is not None:
                on_epoch_end(mb.index, epoch, metrics, lambda p=p: pack.checkpoint(p), final)
            if final:
                leaving.append((p, _result(pack, p, device, how)))
        bar.update(1)
        bar.set_postfix(members=len(pack))
        if leaving:
            for p, outcome in leaving:
                leave(p, outcome)
            gone = {p for p, _ in leaving}
            pack.keep([p for p in range(len(pack)) if p not in gone])
            steps = {}
    bar.close()
    return results  # type: ignore[return-value]


def _build_steps(pack: Pack, split: DeviceSplit, batch: int, n: int, sums: Tensor, dynamic: bool,
                 capture: bool, how: dict[str, str]) -> tuple[dict[int, Step], dict[str, str]]:
    """The step for full batches and, when n is not a multiple of the batch size, the last one."""
    sizes = sorted({min(batch, n), n % batch or min(batch, n)})
    how = dict(how)
    if capture:
        try:
            pool = None
            steps = {}
            for size in sizes:
                steps[size] = Step(pack, split, size, sums, dynamic=dynamic, capture=True, pool=pool)
                pool = steps[size].graph.pool()
            how["vaebench.step"] = "cuda-graph"
            return steps, how
        except Exception as e:  # noqa: BLE001 - any capture failure: run eagerly and say why
            torch.cuda.synchronize()
            how["vaebench.step.fallback"] = f"capture failed, ran eagerly: {type(e).__name__}: {e}"[:500]
    how["vaebench.step"] = "eager"
    return {size: Step(pack, split, size, sums, dynamic=dynamic, capture=False) for size in sizes}, how


@torch.no_grad()
def _validate(pack: Pack, split: DeviceSplit, batch_size: int | None = None) -> list[dict[str, float]]:
    """vaebench.train.validate for every member at once: the same batches and the same fixed-seed
    noise (shared by all members), each member's own objective at full KL weight."""
    batch_size = batch_size or val_batch(pack.model)
    device = split.x.device
    generator = torch.Generator(device=device).manual_seed(VAL_SEED)
    dynamic = split.binarization == "dynamic" and not split.binary
    pack.model.eval()
    sums = torch.zeros(len(pack), 3, device=device)
    ones = torch.ones(len(pack), device=device)
    for start in range(0, len(split), batch_size):
        index = torch.arange(start, min(start + batch_size, len(split)), device=device)
        noise = draw_noise(pack.model, generator, len(index), split.shape, dynamic=dynamic)
        x = split.batch(index, noise.uniform)
        _, batch_sums = pack.losses(x, Noise(None, noise.corrupt, noise.eps), ones, shared_input=True,
                                    chunk=VAL_MEMBER_CHUNK)
        sums += batch_sums
    stochastic = pack.model.stochastic
    return [val_metrics(row, len(split), stochastic) for row in sums.tolist()]


def _result(pack: Pack, p: int, device: torch.device, how: dict[str, str]) -> TrainResult:
    """A member's TrainResult: its own plain model on the device, holding its best epoch's weights."""
    mb = pack.members[p]
    model = build_for(mb.settings, pack.model.in_shape)
    model.set_dataset_size(pack.n_train)  # as the plain loop's model has it (β-TCVAE's N: not in the state dict)
    model.load_state_dict(mb.record.best_model if mb.record.best_model is not None else pack.member_state_dict(p))
    model.to(device).eval()
    r = mb.record
    return TrainResult(model=model, history=r.history, best_epoch=r.best_epoch, epochs_run=r.epoch + 1,
                       stopped_early=r.stopped_early, train_seconds=r.train_seconds, device=device, how=dict(how))


def train_one(settings: RunSettings, data: Dataset, *, resume: dict[str, Any] | None = None,
              on_epoch_end: Callable[[int, dict[str, float], dict[str, Any]], None] | None = None,
              progress: bool = True, should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """One run with the step its settings ask for: captured (this engine, one member) when
    `compile` resolves to graphs, else the plain loop; the callback and the result as
    vaebench.train.train's. A diverged run raises TrainingDiverged, as there."""
    from vaebench.train import train

    if not captured(settings):
        return train(settings, data, resume=resume, on_epoch_end=on_epoch_end, progress=progress,
                     should_stop=should_stop)

    def each(i: int, epoch: int, metrics: dict[str, float], make: Callable[[], dict[str, Any]], final: bool) -> None:
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics, make())

    (result,) = train_packed([settings], data, resumes=[resume], on_epoch_end=each, progress=progress,
                             should_stop=should_stop)
    if isinstance(result, Exception):
        raise result
    return result
