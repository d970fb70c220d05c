"""The training loop on real (embedded) data: learning, resume equivalence, early stopping."""

from __future__ import annotations

import io

import pytest
import torch

from vaebench.config import RunSettings
from vaebench.data import load_dataset
from vaebench.train import dataset_for, float32_math, lr_at, resolve_device, train


def settings(**kw) -> RunSettings:
    base = dict(dataset="digits", model="vae", latent_dim=4, epochs=4, batch_size=64, max_train_samples=512,
                arch_options={"mlp": {"hidden": [32]}}, device="cpu", lr=3e-3)
    return RunSettings(**{**base, **kw})


class Stop(Exception):
    pass


def checkpoint_after(s: RunSettings, data, epoch: int) -> dict:
    """The checkpoint `train` hands out after `epoch` (then interrupted there), round-tripped
    through torch.save / torch.load(weights_only=True) as the runner stores it."""
    saved = {}

    def interrupt(e: int, metrics: dict, checkpoint: dict) -> None:
        if e == epoch:
            buf = io.BytesIO()
            torch.save(checkpoint, buf)
            saved["bytes"] = buf.getvalue()
            raise Stop

    with pytest.raises(Stop):
        train(s, data, on_epoch_end=interrupt, progress=False)
    return torch.load(io.BytesIO(saved["bytes"]), weights_only=True)


def test_training_reduces_the_validation_loss(tmp_path) -> None:
    data = load_dataset("digits", tmp_path)
    result = train(settings(epochs=6), data, progress=False)
    val = [h["val/loss"] for h in result.history]
    assert len(val) == 6 and val[-1] < val[0]
    assert set(result.history[0]) >= {"train/loss", "train/recon", "train/kl", "train/kl_weight",
                                      "train/effective_beta", "val/loss", "val/recon", "val/kl", "val/neg_elbo"}


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path) -> None:
    data = load_dataset("digits", tmp_path)
    s = settings(binarization="dynamic", kl_anneal={"schedule": "linear", "epochs": 2})
    straight = train(s, data, progress=False)
    checkpoint = checkpoint_after(s, data, epoch=1)
    assert checkpoint["epoch"] == 1 and len(checkpoint["history"]) == 2
    resumed = train(s, data, resume=checkpoint, progress=False)
    assert resumed.epochs_run == straight.epochs_run == 4
    assert [h["train/loss"] for h in resumed.history] == [h["train/loss"] for h in straight.history]
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_checkpoint_resumed_twice_gives_the_same_run_twice(tmp_path) -> None:
    """`train` must not change the checkpoint it resumes from: the optimiser's state tensors are
    its own, so a caller that keeps the dict (a retry, a benchmark's twins) starts from it again."""
    data = load_dataset("digits", tmp_path)
    s = settings()
    checkpoint = checkpoint_after(s, data, epoch=1)
    before = [t.clone() for t in checkpoint["optimizer"]["state"][0].values() if isinstance(t, torch.Tensor)]
    first = train(s, data, resume=checkpoint, progress=False)
    after = [t for t in checkpoint["optimizer"]["state"][0].values() if isinstance(t, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "the checkpoint's optimiser state changed"
    assert len(checkpoint["history"]) == 2, "the checkpoint's history grew"
    second = train(s, data, resume=checkpoint, progress=False)
    assert len(first.history) == len(second.history) == 4
    assert [h["train/loss"] for h in second.history] == [h["train/loss"] for h in first.history]


def test_early_stopping_keeps_the_best_model(tmp_path) -> None:
    data = load_dataset("digits", tmp_path)
    # a learning rate this large makes the validation loss worse after the first epochs
    result = train(settings(epochs=30, lr=0.5, patience=2, model="ae"), data, progress=False)
    assert result.stopped_early and result.epochs_run < 30
    val = [h["val/loss"] for h in result.history]
    assert result.best_epoch == val.index(min(val))
    assert result.epochs_run == result.best_epoch + 1 + 2


@pytest.mark.parametrize("model,arch", [("dae", "conv"), ("vae", "conv"), ("ae", "mlp")])
def test_families_train_with_every_option(tmp_path, model: str, arch: str) -> None:
    data = load_dataset("digits", tmp_path)
    s = settings(model=model, arch=arch, epochs=1, image_size=16, binarization="static", reduction="mean",
                 likelihood="gaussian", gaussian_sigma="learned", optimizer="adamw", weight_decay=1e-4)
    result = train(s, data, progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for v in result.history[0].values())
    assert result.model.in_shape == (1, 16, 16)
    assert result.model.log_sigma is not None


def test_device_auto_is_cpu_here_and_cuda_is_checked() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda:0")
        assert resolve_device("auto").type in {expected, "mps"}
    assert resolve_device("cpu") == torch.device("cpu")


def test_float32_math_names_what_torch_lets_cuda_round_to_tf32() -> None:
    cuda = torch.device("cuda")
    assert float32_math(torch.device("cpu")) == "fp32"
    matmul = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):  # torch's defaults
            assert float32_math(cuda) == "matmul fp32, convolutions tf32"
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            assert float32_math(cuda) == "fp32"
        torch.backends.cuda.matmul.allow_tf32 = True
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
            assert float32_math(cuda) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def test_should_stop_interrupts_between_batches(tmp_path) -> None:
    data = load_dataset("digits", tmp_path)
    polls = []

    def should_stop() -> bool:
        polls.append(1)
        return len(polls) > 10  # after 10 batches (512 samples / 64 = 8 per epoch: inside epoch 1)

    epochs_done = []
    with pytest.raises(KeyboardInterrupt):
        train(settings(), data, progress=False, should_stop=should_stop,
              on_epoch_end=lambda e, m, c: epochs_done.append(e))
    assert epochs_done == [0] and len(polls) == 11


@pytest.mark.parametrize("schedule,make", [
    ({"kind": "step", "step_size": 3, "gamma": 0.5}, lambda opt: torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)),
    ({"kind": "cosine"}, lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)),
    ({"kind": "none"}, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)),
])
def test_lr_schedules_match_torch_schedulers(schedule: dict, make) -> None:
    s = settings(epochs=10, lr=0.02, lr_schedule=schedule)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.02)
    scheduler = make(opt)
    for epoch in range(10):
        assert lr_at(s, epoch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), epoch
        opt.step()
        scheduler.step()


def test_geometric_schedule_is_burdas() -> None:
    # Burda et al. 2015, App. C: 3^i epochs at 1e-3 * 10^(-i/7), i = 0..7: 3,280 epochs in all
    s = settings(lr=1e-3, epochs=3280, lr_schedule={"kind": "geometric", "growth": 3, "gamma": 10 ** (-1 / 7)})
    lrs = [lr_at(s, e) for e in range(3280)]
    stages = [lrs.count(v) for v in dict.fromkeys(lrs)]
    assert stages == [3 ** i for i in range(8)]
    assert lrs[0] == 1e-3 and lrs[-1] == pytest.approx(1e-4, rel=1e-9)


def test_lr_is_logged_and_a_resumed_schedule_continues_exactly(tmp_path) -> None:
    data = load_dataset("digits", tmp_path)
    s = settings(lr_schedule={"kind": "step", "step_size": 1, "gamma": 0.5}, binarization="dynamic")
    straight = train(s, data, progress=False)
    assert [h["train/lr"] for h in straight.history] == pytest.approx([3e-3, 1.5e-3, 7.5e-4, 3.75e-4])
    resumed = train(s, data, resume=checkpoint_after(s, data, epoch=1), progress=False)
    assert [h["train/loss"] for h in resumed.history] == [h["train/loss"] for h in straight.history]
    assert [h["train/lr"] for h in resumed.history] == [h["train/lr"] for h in straight.history]
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    # a schedule changes training: the same run at a constant lr ends elsewhere
    constant = train(settings(binarization="dynamic"), data, progress=False)
    assert constant.history[-1]["train/loss"] != straight.history[-1]["train/loss"]


def test_val_fraction_sets_the_validation_split(tmp_path) -> None:
    default = dataset_for(settings(), tmp_path)
    fifth = dataset_for(settings(val_fraction=0.2), tmp_path)
    n = len(default.train) + len(default.val)
    assert len(fifth.train) + len(fifth.val) == n and len(fifth.val) == round(0.2 * n)
    assert len(default.val) == round(0.1 * n)
    assert torch.equal(default.test.x, fifth.test.x)  # the test split is never touched
