"""The evaluation protocol: the IWAE estimator against a closed-form marginal, the bound
properties on a trained VAE, active units, reduction-independence, and re-evaluation."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest
import torch

from vaebench.batches import to_device
from vaebench.cli import main
from vaebench.config import EvaluateSettings, RunSettings, load_experiment
from vaebench.data import load_dataset
from vaebench.evaluate import evaluate, importance_weighted, iw_nll, pixel_baseline
from vaebench.models import build_model
from vaebench.report import default_output
from vaebench.train import train


def linear_gaussian(d: int = 6, k: int = 2, sigma: float = 0.5, seed: int = 0):
    """p(z) = N(0, I), p(x|z) = N(Wz + b, sigma^2 I): p(x) = N(b, W W^T + sigma^2 I) exactly."""
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(d, k, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    x = (torch.randn(5, k, generator=g, dtype=torch.float64) @ w.T + b
         + sigma * torch.randn(5, d, generator=g, dtype=torch.float64))  # (B, D)
    exact = torch.distributions.MultivariateNormal(b, w @ w.T + sigma**2 * torch.eye(d, dtype=torch.float64)).log_prob(x)
    # the exact posterior is N(m, S); q keeps only its diagonal, shifted and twice as wide, so
    # the ELBO is clearly loose while the importance weights stay well-behaved
    s = torch.linalg.inv(torch.eye(k, dtype=torch.float64) + w.T @ w / sigma**2)
    m = (x - b) @ w @ s / sigma**2 + 0.2  # (B, K)
    logvar = torch.log(2 * torch.diagonal(s)).expand_as(m)

    def log_px(z: torch.Tensor) -> torch.Tensor:  # (n, B, K) -> (n, B)
        mean = z @ w.T + b
        return torch.distributions.Normal(mean, sigma).log_prob(x).sum(-1)

    return log_px, m, logvar, exact


def test_iwae_matches_the_exact_marginal_of_a_linear_gaussian_model() -> None:
    log_px, m, logvar, exact = linear_gaussian()
    g = torch.Generator().manual_seed(1)
    log_p, elbo = importance_weighted(log_px, m, logvar, k=20_000, per_chunk=3_000, generator=g)
    assert torch.allclose(log_p, exact, atol=0.02), (log_p - exact)
    assert (elbo < exact - 0.1).all(), "this q must leave a visible ELBO gap"
    # memory is bounded by the chunk, not k: chunks of 7 give the same answer
    log_p_small, _ = importance_weighted(log_px, m, logvar, k=20_000, per_chunk=7,
                                         generator=torch.Generator().manual_seed(2))
    assert torch.allclose(log_p_small, exact, atol=0.02)


def test_iwae_tightens_with_k_on_the_linear_gaussian_model() -> None:
    log_px, m, logvar, exact = linear_gaussian()
    gaps = []  # expected gap E[log p - estimate], averaged over repeats to beat the MC noise
    g = torch.Generator().manual_seed(0)
    for k in (1, 10, 100, 1000):
        runs = [importance_weighted(log_px, m, logvar, k=k, per_chunk=1000, generator=g)[0] for _ in range(100)]
        gaps.append((exact - torch.stack(runs).mean(0)).mean().item())
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 0.05 * gaps[0]


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory):
    data = load_dataset("digits", tmp_path_factory.mktemp("data"))
    s = RunSettings(dataset="digits", model="vae", latent_dim=4, epochs=3, batch_size=64, device="cpu",
                    arch_options={"mlp": {"hidden": [64]}}, lr=3e-3)
    result = train(s, data, progress=False)
    test = to_device(data.test, torch.device("cpu"), image_size=None, binarization="none")
    return result.model, s, data, test


def test_a_dynamic_run_is_scored_on_one_fixed_draw(trained_vae) -> None:
    # the protocol is the same for every run: its binary test images must not depend on what ran
    # before in the process (torch's global generator)
    model, s, data, _ = trained_vae
    cpu, first = torch.device("cpu"), torch.arange(200)
    dynamic = s.model_copy(update={"binarization": "dynamic"})
    protocol = EvaluateSettings(iw_samples=8, clustering=False)
    scored = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        test = to_device(data.test, cpu, image_size=None, binarization="dynamic")
        scored.append(evaluate(model, test, dynamic, protocol).metrics)
    assert scored[0] == scored[1]
    static = to_device(data.test, cpu, image_size=None, binarization="static")
    assert torch.equal(test.batch(first), static.batch(first))  # the static draw: the same images
    assert set(test.batch(first).unique().tolist()) == {0.0, 1.0}
    # training batches still draw afresh
    fresh = to_device(data.train, cpu, image_size=None, binarization="dynamic", fresh=True)
    assert not torch.equal(fresh.batch(first), fresh.batch(first))


def test_bounds_hold_on_a_trained_vae(trained_vae) -> None:
    model, s, _, test = trained_vae
    x = test.batch(torch.arange(100))
    with torch.inference_mode():
        means = []
        for k in (1, 10, 100):
            nll, elbo = iw_nll(model, x, s, k, chunk=2000, generator=torch.Generator().manual_seed(k))
            assert (nll <= -elbo + 1e-4).all(), "nll_iw never exceeds -elbo from the same samples"
            means.append(nll.mean().item())
    assert means[0] >= means[1] >= means[2], means


def test_protocol_metrics_on_a_trained_vae(trained_vae) -> None:
    model, s, data, test = trained_vae
    train_split = to_device(data.train, torch.device("cpu"), image_size=None, binarization="none")
    ev = evaluate(model, test, s, EvaluateSettings(iw_samples=50), train=train_split, num_classes=10)
    m = ev.metrics
    assert m["nll_iw"] <= -m["elbo"] and m["nll_iw_k"] == 50
    assert m["bpd"] == pytest.approx(-m["elbo"] / (64 * math.log(2)))
    assert m["kl"] == pytest.approx(sum(ev.kl_per_dim)) and len(ev.kl_per_dim) == 4
    assert 0 <= m["active_units"] <= 4
    for key in ("kmeans_acc", "nmi", "ari", "silhouette", "knn_acc", "probe_acc"):
        assert key in m
    assert m["knn_acc"] > 0.3  # well above chance (0.1) even after 3 epochs
    assert not ev.not_applicable


def test_evaluation_ignores_the_training_objective(trained_vae) -> None:
    model, s, _, test = trained_vae
    protocol = EvaluateSettings(iw_samples=20, clustering=False)
    other = s.model_copy(update={"reduction": "mean", "beta": 4.0,
                                 "kl_anneal": s.kl_anneal.model_copy(update={"schedule": "linear", "epochs": 3})})
    assert evaluate(model, test, s, protocol).metrics == evaluate(model, test, other, protocol).metrics


def test_active_units_counts_exactly_the_dims_in_use(trained_vae) -> None:
    _, s, _, test = trained_vae
    model = build_model("vae", "mlp", in_shape=(1, 8, 8), latent_dim=6, arch_options={"hidden": [16]})
    with torch.no_grad():
        head = model.to_mean
        head.weight.mul_(20.0)  # clearly varying means ...
        head.weight[[1, 4]] = 0.0  # ... except dims 1 and 4, which ignore the input
        head.bias[[1, 4]] = 0.3
    ev = evaluate(model, test, s.model_copy(update={"latent_dim": 6}), EvaluateSettings(iw_samples=2, clustering=False))
    assert ev.metrics["active_units"] == 4


def test_deterministic_models_have_no_elbo_and_dae_reports_denoising(trained_vae) -> None:
    _, s, _, test = trained_vae
    dae = build_model("dae", "mlp", in_shape=(1, 8, 8), latent_dim=4, arch_options={"hidden": [16]}, noise=0.5)
    ev = evaluate(dae, test, s.model_copy(update={"model": "dae"}), EvaluateSettings(clustering=False))
    assert "elbo" not in ev.metrics and "nll_iw" not in ev.metrics and "elbo" in ev.not_applicable
    assert {"recon_mse", "recon_bce", "noisy_recon_mse", "noisy_recon_bce"} <= set(ev.metrics)


def test_pixel_baseline_is_computed_once_and_cached_on_disk(trained_vae, tmp_path: Path) -> None:
    import vaebench.evaluate as ev_module

    _, _, data, test = trained_vae
    train_split = to_device(data.train, torch.device("cpu"), image_size=None, binarization="none")
    protocol = EvaluateSettings()
    first = pixel_baseline(train_split, test, 10, protocol, "k1", cache_dir=tmp_path)
    assert (tmp_path / "baseline-k1.json").exists()
    assert first["knn_acc"] > 0.9  # kNN on raw digits pixels is strong
    ev_module._BASELINES.clear()
    (tmp_path / "baseline-k1.json").write_text('{"knn_acc": 0.123}')  # proves it is read back, not recomputed
    assert pixel_baseline(train_split, test, 10, protocol, "k1", cache_dir=tmp_path) == {"knn_acc": 0.123}
    ev_module._BASELINES.clear()


def test_vaebench_evaluate_redoes_the_evaluation_without_retraining(tiny_file: Path) -> None:
    assert main(["run", str(tiny_file), "--no-progress", "--only", "model=vae"]) == 0
    exp = load_experiment(tiny_file)
    mlflow.set_tracking_uri(exp.resolved_tracking_uri())
    before = mlflow.search_runs(experiment_names=["tiny"])
    report = default_output(exp)
    report.unlink()  # written by `run`; `evaluate` writes it again
    assert main(["evaluate", str(tiny_file), "--iw-samples", "16", "--no-report"]) == 0
    assert not report.exists()
    assert main(["evaluate", str(tiny_file), "--iw-samples", "16"]) == 0
    assert report.exists()
    after = mlflow.search_runs(experiment_names=["tiny"])
    assert len(after) == len(before), "no new runs"
    cell = after[after["tags.vaebench.kind"] == "cell"].iloc[0]
    assert cell["metrics.test/nll_iw_k"] == 16 and "tags.vaebench.evaluated_at" in after
    assert main(["evaluate", str(tiny_file), "--iw-samples", "0"]) == 2


@pytest.mark.parametrize("arch, channels", [("conv", 1), ("deep_conv", 1), ("conv", 3)])
def test_a_conv_model_is_evaluated_channels_last_with_the_same_numbers(arch: str, channels: int) -> None:
    """The layout only changes the speed (benchmarks/bench_layout.py): every metric agrees with the
    channels-first evaluation of the same weights, and on the CPU the default is channels-last."""
    from vaebench.batches import DeviceSplit
    from vaebench.evaluate import CHANNELS_LAST

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (120, channels, 8, 8), dtype=torch.uint8, generator=gen)
    test = DeviceSplit(x, torch.arange(120) % 10, None, "none")
    s = RunSettings(dataset="digits", model="vae", arch=arch, latent_dim=3, device="cpu")
    torch.manual_seed(0)
    first = build_model("vae", arch, in_shape=(channels, 8, 8), latent_dim=3)
    last = build_model("vae", arch, in_shape=(channels, 8, 8), latent_dim=3)
    last.load_state_dict(first.state_dict())
    protocol = EvaluateSettings(iw_samples=8, clustering=False)
    a = evaluate(first, test, s, protocol, channels_last=False).metrics
    b = evaluate(last, test, s, protocol).metrics
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    conv = [p for p in last.parameters() if p.dim() == 4]
    assert conv and "cpu" in CHANNELS_LAST
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in conv)
    assert any(not p.is_contiguous() for p in conv)  # the layout did change (a 1-channel side is both)
    assert all(p.is_contiguous() for p in first.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the GPU machine)")
@pytest.mark.parametrize("arch", ["conv", "deep_conv"])
def test_channels_last_evaluation_agrees_on_cuda(arch: str) -> None:
    """What putting "cuda" in CHANNELS_LAST would change: cuDNN's NHWC kernels, the same metrics
    (to TF32's rounding, which cuDNN uses for fp32 convolutions by default)."""
    from vaebench.batches import DeviceSplit

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8, generator=gen)
    test = DeviceSplit(x.cuda(), (torch.arange(300) % 10).cuda(), None, "none")
    s = RunSettings(dataset="mnist", model="vae", arch=arch, latent_dim=8, device="cuda")
    torch.manual_seed(0)
    first = build_model("vae", arch, in_shape=(1, 28, 28), latent_dim=8).cuda()
    last = build_model("vae", arch, in_shape=(1, 28, 28), latent_dim=8).cuda()
    last.load_state_dict(first.state_dict())
    protocol = EvaluateSettings(iw_samples=16, clustering=False)
    a = evaluate(first, test, s, protocol, channels_last=False).metrics
    b = evaluate(last, test, s, protocol, channels_last=True).metrics
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-4), key
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in last.parameters() if p.dim() == 4)


def test_a_model_without_convolutions_keeps_its_layout() -> None:
    from vaebench.evaluate import use_channels_last

    model = build_model("vae", "mlp", in_shape=(1, 8, 8), latent_dim=2, arch_options={"hidden": [16]})
    before = [p.data_ptr() for p in model.parameters()]
    use_channels_last(model)
    assert [p.data_ptr() for p in model.parameters()] == before


def test_the_probe_codes_come_from_the_first_training_images_only() -> None:
    """The device part of a cell's evaluation moves only the training images the kNN and probe
    use; under static binarization (drawn image by image) their codes equal those from the whole
    split, exactly."""
    from vaebench.config import Experiment
    from vaebench.results import _measure

    data = load_dataset("mnist5k", "unused")
    s = RunSettings(dataset="mnist5k", model="vae", arch="mlp", arch_options={"mlp": {"hidden": [32]}},
                    latent_dim=3, binarization="static", device="cpu")
    protocol = EvaluateSettings(iw_samples=2, probe_train_samples=700, max_test_samples=300)
    exp = Experiment.model_validate({"name": "probe", "defaults": {"dataset": "mnist5k"},
                                     "evaluate": protocol.model_dump()})
    torch.manual_seed(0)
    model = build_model("vae", "mlp", in_shape=(1, 28, 28), latent_dim=3, arch_options={"hidden": [32]})
    assert len(data.train) > 2 * protocol.probe_train_samples  # the limit really leaves images out
    opts = dict(image_size=None, binarization="static")
    whole = evaluate(model, to_device(data.test, torch.device("cpu"), **opts), s, protocol,
                     train=to_device(data.train, torch.device("cpu"), **opts), num_classes=10, score=False)
    limited = _measure(exp, s, model, data, score=False)
    assert limited.codes.train_z.shape == (700, 3)
    assert (limited.codes.train_z == whole.codes.train_z).all()
    assert (limited.codes.train_y == whole.codes.train_y).all()
    assert limited.metrics == whole.metrics


def test_the_config_knows_every_metric_an_evaluation_logs(trained_vae) -> None:
    # the experiments file is checked against vaebench.config's list of metric names (tune.metric,
    # reference:): it must be exactly what evaluations log, family by family
    from vaebench.clustering import SCORE_KEYS
    from vaebench.config.schema import CLUSTERING_METRICS, FAMILY_METRICS, TEST_METRICS

    assert CLUSTERING_METRICS == tuple(f"test/{k}" for k in SCORE_KEYS)

    model, s, data, test = trained_vae
    train = to_device(data.train, torch.device("cpu"), image_size=None, binarization="none")
    seen: set[str] = set()
    for family in ("vae", "ae", "dae", "vq_vae"):
        m = model if family == "vae" else build_model(family, "mlp", in_shape=(1, 8, 8), latent_dim=4,
                                                      arch_options={"hidden": [16]})
        ev = evaluate(m, test, s.model_copy(update={"model": family}), EvaluateSettings(iw_samples=2), train=train,
                      num_classes=10)
        logged = {f"test/{k}" for k in ev.metrics}
        assert all(only == family for metric, only in FAMILY_METRICS.items() if metric in logged), (family, logged)
        seen |= set(ev.metrics)
    assert seen == set(TEST_METRICS)
