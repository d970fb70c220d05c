"""The packed engine against the plain loop: a member of a pack trains exactly as it would alone.

Everything here runs on the CPU (where `--pack auto` would not pack: these tests force the packed
path). The two CUDA tests at the end check the captured step on a GPU; CI has none, the device
machine runs them.
"""

from __future__ import annotations

import io

import pytest
import torch

from vaebench.config import RunSettings
from vaebench.data import load_dataset
from vaebench.packed import StackedAdam, train_packed
from vaebench.train import TrainingDiverged, TrainResult, train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the GPU machine)")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return load_dataset("digits", tmp_path_factory.mktemp("data"))


def cell(**kw) -> RunSettings:
    base = dict(dataset="digits", model="vae", latent_dim=4, epochs=10, batch_size=32, max_train_samples=640,
                arch_options={"mlp": {"hidden": [32]}}, device="cpu")
    return RunSettings(**{**base, **kw})


def assert_same_training(alone: TrainResult, packed: TrainResult, rtol: float = 1e-4, atol: float = 1e-5,
                         weights_rtol: float = 1e-2) -> None:
    """Every epoch's losses agree to `rtol`; every weight tensor to `weights_rtol` in relative norm.
    The weights get a looser bound because Adam amplifies summation-order differences (a grouped
    convolution's weight gradient sums in another order than a plain one's) where gradients are
    near zero: measured up to 9e-4 after 30 steps at lr 3e-3 on a 1-thread CPU. A member trained
    with another member's settings or gradient is off by 10-50%, and its losses show it at once."""
    assert packed.epochs_run == alone.epochs_run and packed.best_epoch == alone.best_epoch
    assert packed.stopped_early == alone.stopped_early
    for a, b in zip(alone.history, packed.history):
        for key in ("train/loss", "train/recon", "train/kl", "train/kl_weight", "train/lr", "val/loss", "val/recon",
                    "val/kl"):
            assert b[key] == pytest.approx(a[key], rel=rtol, abs=atol), key
    for (name, a), b in zip(alone.model.state_dict().items(), packed.model.state_dict().values()):
        a, b = a.double(), b.double()
        deviation = float((a - b).norm() / a.norm().clamp_min(1e-12))
        assert deviation <= weights_rtol, f"{name}: relative deviation {deviation:.2e}"


def test_members_differing_in_every_per_run_setting_train_as_alone(digits) -> None:
    # 20 steps x 10 epochs = 200 steps each
    members = [
        cell(seed=0, beta=1.0),
        cell(seed=1, beta=4.0, reduction="mean", lr=3e-3, kl_anneal={"schedule": "linear", "epochs": 4},
             lr_schedule={"kind": "cosine"}),
        cell(seed=2, beta=0.5, likelihood="gaussian", optimizer="adamw", weight_decay=1e-2),
        cell(seed=3, beta=2.0, lr=5e-4, weight_decay=1e-3, kl_anneal={"schedule": "cyclical", "epochs": 6},
             lr_schedule={"kind": "step", "step_size": 3, "gamma": 0.3}),
        cell(seed=4, patience=2, lr=2e-2),
    ]
    packed = train_packed(members, digits, progress=False)
    for s, p in zip(members, packed):
        assert isinstance(p, TrainResult)
        assert p.how["vaebench.engine"] == "packed" and p.how["vaebench.pack.size"] == "5"
        assert_same_training(train(s, digits, progress=False), p)



def test_a_member_trains_the_same_whatever_its_siblings(digits) -> None:
    """Packing itself changes nothing: a member of a pack of 8 (other betas, reductions, seeds)
    trains as the same run packed alone, to the bit here (the MLP's batched products compute each
    member's as a lone one does); what a pack differs from the plain loop by is the engine's
    arithmetic (vmap'd products, the flat Adam), not its company. The bound below is that bit-for-bit
    result with room for another CPU's BLAS kernels."""
    members = [cell(seed=i, beta=b, reduction=r, epochs=4)
               for i, (b, r) in enumerate((b, r) for b in (0.5, 1.0, 2.0, 4.0) for r in ("sum", "mean"))]
    packed = train_packed(members, digits, progress=False)
    for t in (0, 7):
        (alone,) = train_packed([members[t]], digits, progress=False)
        assert_same_training(alone, packed[t], rtol=1e-6, atol=1e-7, weights_rtol=1e-6)


@pytest.mark.parametrize("model,arch,extra", [
    ("dae", "deep_conv", dict(image_size=16, binarization="static", likelihood="gaussian", gaussian_sigma="learned")),
    ("vae", "conv", dict(binarization="dynamic", reduction="mean")),
    ("ae", "mlp", dict(likelihood="gaussian", gaussian_sigma=0.5)),
    ("vae", "deep_conv", dict(image_size=16, prior={"kind": "vamp", "pseudo_inputs": 6})),
])
def test_every_family_and_architecture_packs(digits, model: str, arch: str, extra: dict) -> None:
    opts = {"deep_conv": {"channels": [8, 16]}, "conv": {"channels": [8, 16]}, "mlp": {"hidden": [32]}}
    members = [cell(model=model, arch=arch, arch_options=opts, epochs=3, seed=i, noise=0.1 + 0.3 * i,
                    lr=1e-3 * (i + 1), **extra) for i in range(3)]
    packed = train_packed(members, digits, progress=False)
    for s, p in zip(members, packed):
        assert_same_training(train(s, digits, progress=False), p)
    if model == "dae":  # each member corrupted with its own noise factor
        assert [float(p.model.noise_scale) for p in packed] == pytest.approx([0.1, 0.4, 0.7])


# Per family: members that differ in the options each may keep as its own (Options.PER_MEMBER).
FAMILY_MEMBERS = {
    "iwae": [dict(k=3)] * 3,
    "beta_tcvae": [dict(beta=1.0), dict(beta=6.0, alpha=0.5), dict(gamma=3.0)],
    "wae_mmd": [dict(weight=1.0), dict(weight=10.0), dict(weight=100.0)],
    "info_vae": [dict(alpha=0.0), dict(alpha=0.5, weight=5.0), dict(alpha=1.0, weight=100.0)],
    "vq_vae": [dict(code_dim=2, codebook_size=16, commitment=c) for c in (0.1, 0.25, 1.0)],
    "vq_vae+ema": [dict(code_dim=2, codebook_size=16, ema=True, decay=d, commitment=c)
                   for d, c in ((0.8, 0.25), (0.9, 0.5), (0.99, 0.1))],
}


# (beta_tcvae on mlp: its sampled KL is ~0.01 nats after 3 epochs here, and a grouped convolution's
# other summation order moves so small a difference of two log-densities beyond the tolerance)
@pytest.mark.parametrize("family,arch", [("iwae", "mlp"), ("beta_tcvae", "mlp"), ("wae_mmd", "conv"),
                                         ("info_vae", "mlp"), ("vq_vae", "mlp"), ("vq_vae+ema", "deep_conv")])
def test_every_new_family_packs_with_its_own_options_per_member(digits, family: str, arch: str) -> None:
    model = family.split("+")[0]
    opts = {"deep_conv": {"channels": [8, 16]}, "conv": {"channels": [8, 16]}, "mlp": {"hidden": [32]}}
    members = [cell(model=model, arch=arch, arch_options=opts, epochs=3, seed=i, beta=0.5 + i,
                    binarization="dynamic", family_options={model: o}) for i, o in enumerate(FAMILY_MEMBERS[family])]
    packed = train_packed(members, digits, progress=False)
    for s, p in zip(members, packed):
        assert p.how["vaebench.engine"] == "packed"
        alone = train(s, digits, progress=False)
        assert_same_training(alone, p)
        # and what the state dict leaves out (beta_tcvae's N, the training split's size)
        kept = alone.model.state_dict()
        extra = {k: v.tolist() for k, v in alone.model.named_buffers() if k not in kept}
        assert {k: v.tolist() for k, v in p.model.named_buffers() if k in extra} == pytest.approx(extra)


def test_members_leave_as_they_stop_early_or_diverge(digits) -> None:
    members = [cell(seed=0, epochs=12), cell(seed=1, lr=0.05, patience=2, epochs=12),
               cell(seed=2, beta=1e6, lr=10.0, epochs=12)]
    order: list[int] = []
    results = train_packed(members, digits, progress=False, on_done=lambda i, r: order.append(i))
    assert order == [2, 1, 0]  # diverged in epoch 0, stopped early later, ran all 12 epochs
    diverged, stopped, full = results[2], results[1], results[0]
    assert isinstance(diverged, TrainingDiverged) and "not finite at epoch 0" in str(diverged)
    assert stopped.stopped_early and stopped.epochs_run < 12 and full.epochs_run == 12
    with pytest.raises(TrainingDiverged, match="epoch 0"):
        train(members[2], digits, progress=False)
    assert_same_training(train(members[1], digits, progress=False), stopped)
    assert_same_training(train(members[0], digits, progress=False), full)


def _checkpoint_at(settings: RunSettings, data, epoch: int, packed: bool) -> dict:
    """The checkpoint a run writes after `epoch` (through either engine), round-tripped through
    torch.save / torch.load(weights_only=True) as the runner stores it."""
    saved = {}

    def keep(*args) -> None:
        e, make = (args[1], args[3]) if packed else (args[0], lambda: args[2])  # (i, e, m, make, final) | (e, m, ckpt)
        if e == epoch:
            buf = io.BytesIO()
            torch.save(make(), buf)
            saved["bytes"] = buf.getvalue()

    if packed:
        train_packed([settings], data, progress=False, on_epoch_end=keep)
    else:
        train(settings, data, progress=False, on_epoch_end=keep)
    return torch.load(io.BytesIO(saved["bytes"]), weights_only=True)


def test_resume_members_at_different_epochs_and_across_engines(digits) -> None:
    a = cell(seed=0, binarization="dynamic", epochs=6, kl_anneal={"schedule": "linear", "epochs": 3})
    b = cell(seed=1, beta=2.0, optimizer="adamw", weight_decay=1e-2, epochs=6, binarization="dynamic",
             lr_schedule={"kind": "step", "step_size": 2, "gamma": 0.5})
    straight_a, straight_b = train(a, digits, progress=False), train(b, digits, progress=False)
    # a was checkpointed by the plain loop after epoch 1, b by the packed engine after epoch 3
    resumes = [_checkpoint_at(a, digits, 1, packed=False), _checkpoint_at(b, digits, 3, packed=True)]
    ra, rb = train_packed([a, b], digits, resumes=resumes, progress=False)
    assert_same_training(straight_a, ra)
    assert_same_training(straight_b, rb)
    # and the plain loop resumes what the packed engine checkpointed
    assert_same_training(straight_b, train(b, digits, resume=resumes[1], progress=False))


def test_runs_that_cannot_share_a_step_are_refused(digits) -> None:
    with pytest.raises(ValueError, match="cannot share a step"):
        train_packed([cell(), cell(binarization="dynamic")], digits, progress=False)


def test_a_member_resumed_after_its_last_epoch_leaves_at_once(digits) -> None:
    s = cell(epochs=3)
    done = _checkpoint_at(s, digits, 2, packed=False)
    (result,) = train_packed([s], digits, resumes=[done], progress=False)
    assert result.epochs_run == 3 and len(result.history) == 3
    # nothing was trained here: no tags of how (the run keeps those of the attempt that trained it),
    # in either engine; a run that did train an epoch here says how
    assert result.how == {} and train(s, digits, resume=done, progress=False).how == {}
    assert train(s, digits, resume=_checkpoint_at(s, digits, 1, packed=False), progress=False).how == \
        {"vaebench.engine": "plain", "vaebench.step": "eager"}


def test_graphs_requested_without_cuda_run_eagerly_and_say_so(digits) -> None:
    (r,) = train_packed([cell(epochs=1, compile="graphs")], digits, progress=False)
    assert r.how["vaebench.step"] == "eager"
    assert "needs CUDA" in r.how["vaebench.step.fallback"]


def test_should_stop_interrupts_a_pack_between_steps(digits) -> None:
    polls: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        train_packed([cell(), cell(seed=1)], digits, progress=False,
                     should_stop=lambda: polls.append(1) or len(polls) > 25)
    assert len(polls) == 26  # 20 steps per epoch: stopped inside epoch 1


def test_stacked_adam_matches_torch_optim() -> None:
    torch.manual_seed(0)
    members = [cell(lr=1e-3), cell(lr=3e-2, weight_decay=0.1), cell(optimizer="adamw", lr=1e-2, weight_decay=0.3)]
    params = [torch.randn(3, 5, 4), torch.randn(3, 7)]
    plain = [[p[m].clone().requires_grad_() for p in params] for m in range(3)]
    optims = [{"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[s.optimizer](ps, lr=s.lr, weight_decay=s.weight_decay)
              for s, ps in zip(members, plain)]
    stacked = StackedAdam([p.clone() for p in params], members)
    for _ in range(50):
        grads = [torch.randn_like(p) for p in params]
        stacked.update(grads)
        for m, (opt, ps) in enumerate(zip(optims, plain)):
            for p, g in zip(ps, grads):
                p.grad = g[m].clone()
            opt.step()
    for m in range(3):
        for p, q in zip(stacked.params, plain[m]):
            torch.testing.assert_close(p[m], q.detach(), rtol=1e-5, atol=1e-6)
        state = stacked.member_state(m, optims[m].state_dict())
        assert float(state["state"][0]["step"]) == 50
        torch.testing.assert_close(state["state"][1]["exp_avg_sq"], optims[m].state_dict()["state"][1]["exp_avg_sq"])


@cuda
def test_captured_step_equals_the_eager_step_on_cuda(digits) -> None:
    members = [cell(device="cuda", seed=i, beta=0.5 + i, binarization="dynamic", epochs=4) for i in range(4)]
    graphs = train_packed([m.model_copy(update={"compile": "graphs"}) for m in members], digits, progress=False)
    eager = train_packed([m.model_copy(update={"compile": "off"}) for m in members], digits, progress=False)
    assert graphs[0].how["vaebench.step"] == "cuda-graph" and eager[0].how["vaebench.step"] == "eager"
    for g, e in zip(graphs, eager):
        assert_same_training(e, g, rtol=1e-5, atol=1e-6, weights_rtol=1e-5)


@cuda
def test_packed_members_match_the_plain_loop_on_cuda(digits) -> None:
    # cuDNN convolutions run in TF32 by default (10-bit mantissas): off here, so that what is
    # compared is the packing, not two roundings of TF32
    members = [cell(device="cuda", model="dae", arch="conv", arch_options={"conv": {"channels": [8, 16]}},
                    seed=i, noise=0.2 * (i + 1), epochs=4) for i in range(3)]
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        packed = train_packed(members, digits, progress=False)
        alone = [train(s, digits, progress=False) for s in members]
    assert packed[0].how["vaebench.step"] == "cuda-graph"
    for a, p in zip(alone, packed):
        assert_same_training(a, p)


@cuda
@pytest.mark.parametrize("family", [*FAMILY_MEMBERS, "vamp"])
def test_every_family_captures_its_packed_step_on_cuda(digits, family: str) -> None:
    model = family.split("+")[0] if family != "vamp" else "vae"
    options = FAMILY_MEMBERS.get(family, [{}] * 2)[:2]
    extra = dict(prior={"kind": "vamp", "pseudo_inputs": 10}) if family == "vamp" else {}
    members = [cell(device="cuda", model=model, epochs=2, seed=i, beta=0.5 + i, family_options={model: o}, **extra)
               for i, o in enumerate(options)]
    graphs = train_packed([m.model_copy(update={"compile": "graphs"}) for m in members], digits, progress=False)
    eager = train_packed([m.model_copy(update={"compile": "off"}) for m in members], digits, progress=False)
    assert graphs[0].how["vaebench.step"] == "cuda-graph", graphs[0].how.get("vaebench.step.fallback")
    for g, e in zip(graphs, eager):
        assert_same_training(e, g, rtol=1e-4, atol=1e-5, weights_rtol=1e-3)


@cuda
def test_the_memory_estimate_covers_what_each_member_adds_on_cuda(digits) -> None:
    """vaebench.plan.member_bytes against the peak it estimates: what two more members add to a
    captured pack's peak allocation (constants such as cuBLAS's workspace cancel out)."""
    from vaebench.plan import member_bytes

    def peak(k: int) -> int:
        members = [cell(device="cuda", seed=i, epochs=1, arch_options={"mlp": {"hidden": [400, 400]}})
                   for i in range(k)]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        assert train_packed(members, digits, progress=False)[0].how["vaebench.step"] == "cuda-graph"
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    peak(2)  # lazy initialisations (cuBLAS, the split on the device) out of the way
    added = peak(4) - peak(2)
    estimate = 2 * member_bytes(cell(arch_options={"mlp": {"hidden": [400, 400]}}), digits.shape)
    assert added <= estimate <= 5 * added, (added, estimate)


def test_stacked_adam_updates_one_flat_buffer_whatever_the_number_of_parameters() -> None:
    """Its update launches the same few element-wise kernels for 2 parameter tensors or 20 (once
    per parameter, a small model's packed step was mostly optimiser kernels), and the parameters
    are views of its buffer, so they see every update and survive members leaving."""
    from torch.profiler import ProfilerActivity, profile

    members = [cell(lr=1e-3), cell(lr=1e-2, weight_decay=0.1), cell(optimizer="adamw", weight_decay=0.2)]

    def ops_per_update(n_params: int) -> int:
        adam = StackedAdam([torch.randn(3, 4, 5) for _ in range(n_params)], members)
        grads = [torch.randn(3, 4, 5) for _ in range(n_params)]
        adam.update(grads)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            adam.update(grads)
        views = ("aten::reshape", "aten::view", "aten::unsqueeze")  # no kernel
        return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None
                   and e.name not in views)

    assert ops_per_update(20) == ops_per_update(2)

    adam = StackedAdam([torch.randn(3, 4, 5), torch.randn(3, 7)], members)
    for p in adam.params:
        assert p.untyped_storage().data_ptr() == adam.flat.untyped_storage().data_ptr()
    adam.update([torch.randn(3, 4, 5), torch.randn(3, 7)])
    before = [p[[0, 2]].clone() for p in adam.params]
    moments = adam.member_state(2, torch.optim.AdamW([torch.zeros(1)]).state_dict())
    adam.keep(torch.tensor([0, 2]))
    assert adam.flat.shape == (2, 27)
    for p, b in zip(adam.params, before):
        torch.testing.assert_close(p, b)
        assert p.untyped_storage().data_ptr() == adam.flat.untyped_storage().data_ptr()
    after = adam.member_state(1, torch.optim.AdamW([torch.zeros(1)]).state_dict())
    torch.testing.assert_close(after["state"][1]["exp_avg"], moments["state"][1]["exp_avg"])
