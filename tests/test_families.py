"""The families beyond ae/vae/dae and the VampPrior: each objective against a closed form or a
computation by hand on a tiny case, their options as run settings, and the evaluation under each
model's own prior. (Shapes and one training step of every family x arch x size: test_models.py;
packed against alone: test_packed.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from vaebench.batches import to_device
from vaebench.config import ConfigError, EvaluateSettings, RunSettings, load_experiment
from vaebench.data import load_dataset
from vaebench.evaluate import codebook_metrics, evaluate, importance_weighted, iw_nll
from vaebench.losses import log_normal_diag, log_normal_std, mmd, tc_decomposition
from vaebench.matrix import expand, run_key
from vaebench.models import ARCHS, build_model
from vaebench.models import priors as priors_module
from vaebench.plan import pack_key
from vaebench.train import train, val_batch

K = 4


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return load_dataset("digits", tmp_path_factory.mktemp("data"))


def tiny(**kw) -> RunSettings:
    base = dict(dataset="digits", latent_dim=K, epochs=2, batch_size=64, max_train_samples=256,
                arch_options={"mlp": {"hidden": [32]}}, device="cpu", lr=3e-3)
    return RunSettings(**{**base, **kw})


# --- the VampPrior -------------------------------------------------------------------------------


def test_vamp_log_prior_is_the_mixture_of_the_pseudo_input_posteriors() -> None:
    torch.manual_seed(0)
    model = build_model("vae", "mlp", in_shape=(1, 8, 8), latent_dim=10, arch_options={"hidden": [16]},
                        prior="vamp", pseudo_inputs=200).double()
    with torch.no_grad():
        model.prior.pseudo_inputs.uniform_(-0.5, 1.5)  # some outside [0, 1]: clamped, as the hard tanh does
        post = model.encode(model.prior.pseudo_inputs.clamp(0, 1))
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=torch.zeros(200, dtype=torch.float64)),
        torch.distributions.Independent(torch.distributions.Normal(post.mean, torch.exp(0.5 * post.logvar)), 1))
    z = 2 * torch.randn(2, 5000, 10, dtype=torch.float64)  # 10,000 rows: more than one chunk of MIXTURE_CHUNK
    assert 10_000 > priors_module.MIXTURE_CHUNK // (200 * 10)
    with torch.no_grad():
        assert torch.allclose(model.log_prior(z), mixture.log_prob(z), atol=1e-9)
        samples = model.sample_prior(7)
    assert samples.shape == (7, 10)


def test_vamp_kl_is_the_single_sample_estimate_and_trains_the_pseudo_inputs() -> None:
    torch.manual_seed(0)
    model = build_model("vae", "conv", in_shape=(1, 8, 8), latent_dim=K, arch_options={"channels": [4, 8]},
                        prior="vamp", pseudo_inputs=3)
    x = torch.rand(5, 1, 8, 8)
    out = model(x)
    terms = model.terms(out, x, likelihood="bernoulli", recon_scale=1.0, kl_coef=2.0)
    by_hand = log_normal_diag(out.z, out.posterior.mean, out.posterior.logvar) - model.log_prior(out.z)
    assert torch.allclose(terms.kl, by_hand) and torch.allclose(terms.loss, terms.recon + 2.0 * by_hand)
    assert model.kl_per_dim(out.posterior) is None
    terms.loss.mean().backward()
    assert model.prior.pseudo_inputs.grad is not None and model.prior.pseudo_inputs.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", list(ARCHS))
def test_vamp_builds_on_every_architecture_and_keeps_its_pseudo_inputs(arch: str, tmp_path) -> None:
    model = build_model("vae", arch, in_shape=(1, 28, 28), latent_dim=K, prior="vamp", pseudo_inputs=5)
    assert model.prior.pseudo_inputs.shape == (5, 1, 28, 28)
    assert model.sample_prior(3).shape == (3, K)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    fresh = build_model("vae", arch, in_shape=(1, 28, 28), latent_dim=K, prior="vamp", pseudo_inputs=5)
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert torch.equal(fresh.prior.pseudo_inputs, model.prior.pseudo_inputs)


def test_vamp_with_batch_norm_trains_the_prior_it_is_evaluated_with() -> None:
    # deep_conv normalises by batch: the pseudo-inputs must not be a batch of their own (their own
    # statistics in training, the running ones in evaluation) nor leak into the running statistics
    torch.manual_seed(0)
    model = build_model("vae", "deep_conv", in_shape=(1, 28, 28), latent_dim=K, prior="vamp", pseudo_inputs=6)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms
    model.train()
    x = torch.rand(8, 1, 28, 28)
    out = model(x)
    model.terms(out, x, likelihood="bernoulli", recon_scale=1.0, kl_coef=1.0).loss.mean().backward()
    assert all(m.num_batches_tracked.item() == 1 for m in norms if m.num_batches_tracked is not None)
    assert all(m.training for m in norms)  # restored
    with torch.no_grad():
        training = model.prior.components(model)
        model.eval()
        evaluated = model.prior.components(model)
    assert all(torch.equal(a, b) for a, b in zip(training, evaluated))


def test_the_evaluation_uses_the_models_own_prior(digits) -> None:
    s = tiny(model="vae", prior={"kind": "vamp", "pseudo_inputs": 8})
    model = train(s, digits, progress=False).model
    test = to_device(digits.test, torch.device("cpu"), image_size=None, binarization="none")
    x = test.batch(torch.arange(50))
    with torch.inference_mode():
        nll, elbo = iw_nll(model, x, s, 64, generator=torch.Generator().manual_seed(0))
        post = model.encode(x)

        def log_px(z: torch.Tensor) -> torch.Tensor:
            logits = model.decode(z.reshape(-1, K)).view(z.shape[0], 50, 1, 8, 8)
            return -torch.nn.functional.binary_cross_entropy_with_logits(
                logits, x.expand_as(logits), reduction="none").flatten(2).sum(2)

        own, _ = importance_weighted(log_px, post.mean, post.logvar, 64, 64, torch.Generator().manual_seed(0),
                                     log_prior=model.log_prior)
        standard, _ = importance_weighted(log_px, post.mean, post.logvar, 64, 64, torch.Generator().manual_seed(0),
                                          log_prior=log_normal_std)
    assert torch.allclose(-nll, own, atol=1e-4)
    assert (own - standard).abs().mean() > 0.01  # N(0, I) in its place gives other numbers
    assert (nll <= -elbo + 1e-4).all()
    ev = evaluate(model, test, s, EvaluateSettings(iw_samples=16, clustering=False))
    m = ev.metrics
    assert m["nll_iw"] <= -m["elbo"] and m["kl"] > 0 and ev.kl_per_dim == []  # no per-dim table for a mixture
    assert math.isfinite(m["elbo"]) and m["bpd"] > 0


def test_vamp_is_a_setting_of_the_families_that_take_it(write_yaml) -> None:
    assert RunSettings(model="vae", prior={"kind": "vamp"}).prior.pseudo_inputs == 500
    with pytest.raises(ValidationError, match=r"prior.kind 'vamp' is not available for model 'ae'; "
                                              r"allowed models: vae, iwae"):
        RunSettings(model="ae", prior={"kind": "vamp"})
    with pytest.raises(ValidationError):
        RunSettings(prior={"kind": "vamp", "pseudo_inputs": 0})
    # a matrix crossing families and priors excludes the cells that cannot exist
    path = write_yaml("""
        name: p
        defaults: {dataset: digits}
        matrix:
          model: [ae, vae]
          prior.kind: [standard, vamp]
        exclude:
          - {model: ae, prior.kind: vamp}
        """)
    specs = expand(load_experiment(path))
    assert sorted((s.settings.model, s.settings.prior.kind) for s in specs) == [
        ("ae", "standard"), ("vae", "standard"), ("vae", "vamp")]
    bad = write_yaml(path.read_text().replace("exclude:\n  - {model: ae, prior.kind: vamp}", ""), "bad.yaml")
    with pytest.raises(ConfigError, match=r"not available for model 'ae'; allowed models: vae, iwae \(exclude the "
                                          r"other cells: exclude: \[\{model: ae, prior.kind: vamp\}\]\)"):
        load_experiment(bad)
    # the prior in the defaults: the ae cells that the prior axis makes valid are kept, the others
    # excluded (each value was once judged with the defaults alone, and ae refused)
    text = path.read_text().replace("defaults: {dataset: digits}", "defaults: {dataset: digits, prior: {kind: vamp}}")
    specs = expand(load_experiment(write_yaml(text, "prior-in-defaults.yaml")))
    assert sorted((s.settings.model, s.settings.prior.kind) for s in specs) == [
        ("ae", "standard"), ("vae", "standard"), ("vae", "vamp")]


# --- iwae ----------------------------------------------------------------------------------------


def test_iwae_loss_is_minus_the_log_mean_importance_weight() -> None:
    torch.manual_seed(0)
    model = build_model("iwae", "mlp", in_shape=(1, 3, 3), latent_dim=2, arch_options={"hidden": [5]},
                        family_options={"k": 4}).double()
    assert model.eps_shape(6) == (4, 6, 2)
    x = torch.rand(6, 1, 3, 3, dtype=torch.float64).round()
    eps = torch.randn(4, 6, 2, dtype=torch.float64)
    out = model(x, eps)
    terms = model.terms(out, x, likelihood="bernoulli", recon_scale=1.0, kl_coef=1.0)
    # by hand, per image and sample: log w = log p(x|z) + log N(z; 0, I) - log q(z|x)
    post = model.encode(x)
    std = torch.exp(0.5 * post.logvar)
    log_w = torch.empty(4, 6, dtype=torch.float64)
    for i in range(4):
        z = post.mean + std * eps[i]
        p = torch.sigmoid(model.decode(z))
        log_px = (x * p.log() + (1 - x) * (1 - p).log()).flatten(1).sum(1)
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
        log_qz = torch.distributions.Normal(post.mean, std).log_prob(z).sum(1)
        log_w[i] = log_px + log_pz - log_qz
    expected = -(torch.logsumexp(log_w, 0) - math.log(4))
    assert torch.allclose(terms.loss, expected, atol=1e-9)
    assert torch.allclose(terms.recon + terms.kl, -log_w.mean(0), atol=1e-9)  # the 4-sample -ELBO
    assert (terms.loss <= terms.recon + terms.kl + 1e-12).all()  # never looser than the ELBO (Jensen)
    # Burda et al.'s VAE with k samples: the mean of the log-weights
    model.options = model.options.model_copy(update={"objective": "vae"})
    vae_terms = model.terms(out, x, likelihood="bernoulli", recon_scale=1.0, kl_coef=1.0)
    assert torch.allclose(vae_terms.loss, -log_w.mean(0), atol=1e-9)


def test_iwae_validates_on_smaller_batches_as_it_decodes_k_images_per_image() -> None:
    assert val_batch(build_model("iwae", "mlp", in_shape=(1, 4, 4), latent_dim=2, family_options={"k": 50})) == 20
    assert val_batch(build_model("vae", "mlp", in_shape=(1, 4, 4), latent_dim=2)) == 1024


def test_iwae_with_one_sample_is_the_vae_objective_with_a_sampled_kl() -> None:
    torch.manual_seed(0)
    model = build_model("iwae", "mlp", in_shape=(1, 3, 3), latent_dim=2, family_options={"k": 1}).double()
    x = torch.rand(5, 1, 3, 3, dtype=torch.float64)
    out = model(x, torch.randn(1, 5, 2, dtype=torch.float64))
    t = model.terms(out, x, likelihood="bernoulli", recon_scale=0.5, kl_coef=3.0)
    assert torch.allclose(t.loss, 0.5 * t.recon + 3.0 * t.kl, atol=1e-12)


# --- beta_tcvae -----------------------------------------------------------------------------------


def test_tc_decomposition_by_hand() -> None:
    # two images, two dims: every term written out with math.log / math.exp
    z = torch.tensor([[0.3, -1.0], [1.2, 0.4]], dtype=torch.float64)
    mean = torch.tensor([[0.0, -0.5], [1.0, 1.0]], dtype=torch.float64)
    logvar = torch.tensor([[0.0, -1.0], [0.5, 0.2]], dtype=torch.float64)
    n_data = 10.0

    def log_q(i: int, j: int, d: int) -> float:  # log N(z_id; mean_jd, exp(logvar_jd))
        v = math.exp(logvar[j, d])
        return -0.5 * ((z[i, d].item() - mean[j, d].item()) ** 2 / v + math.log(v) + math.log(2 * math.pi))

    def lse(values: list[float]) -> float:
        return math.log(sum(math.exp(v) for v in values))

    log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    mi, tc, dim_kl = tc_decomposition(z, mean, logvar, log_pz, n_data)
    for i in range(2):
        log_qz = lse([log_q(i, j, 0) + log_q(i, j, 1) for j in range(2)]) - math.log(n_data * 2)
        log_prod = sum(lse([log_q(i, j, d) for j in range(2)]) - math.log(n_data * 2) for d in range(2))
        log_qzx = log_q(i, i, 0) + log_q(i, i, 1)
        assert mi[i].item() == pytest.approx(log_qzx - log_qz, abs=1e-12)
        assert tc[i].item() == pytest.approx(log_qz - log_prod, abs=1e-12)
        assert dim_kl[i].item() == pytest.approx(log_prod - log_pz[i].item(), abs=1e-12)


def test_beta_tcvae_objective_and_the_dataset_size() -> None:
    torch.manual_seed(0)
    opts = {"alpha": 0.5, "beta": 6.0, "gamma": 2.0}
    model = build_model("beta_tcvae", "mlp", in_shape=(1, 4, 4), latent_dim=3, family_options=opts).double()
    x = torch.rand(8, 1, 4, 4, dtype=torch.float64)
    out = model(x, torch.randn(8, 3, dtype=torch.float64))
    model.set_dataset_size(100)
    t100 = model.terms(out, x, likelihood="bernoulli", recon_scale=1.0, kl_coef=2.0)
    model.set_dataset_size(1000)
    t1000 = model.terms(out, x, likelihood="bernoulli", recon_scale=1.0, kl_coef=2.0)
    # log N enters MI with +1, TC with +(K - 1), the dim-wise KL with -K: the loss moves by exactly
    # kl_coef * (alpha + beta (K - 1) - gamma K) * log(1000 / 100)
    shift = 2.0 * (0.5 + 6.0 * 2 - 2.0 * 3) * math.log(10.0)
    assert torch.allclose(t1000.loss - t100.loss, torch.full((8,), shift, dtype=torch.float64), atol=1e-9)
    # the unweighted parts sum to the sampled KL, whatever N
    sampled_kl = log_normal_diag(out.z, out.posterior.mean, out.posterior.logvar) - log_normal_std(out.z)
    assert torch.allclose(t100.kl, sampled_kl) and torch.allclose(t1000.kl, sampled_kl)
    # with every weight 1 it is the VAE objective with that sampled KL
    plain = build_model("beta_tcvae", "mlp", in_shape=(1, 4, 4), latent_dim=3,
                        family_options={"alpha": 1, "beta": 1, "gamma": 1}).double()
    plain.load_state_dict(model.state_dict())
    t = plain.terms(out, x, likelihood="bernoulli", recon_scale=1.0, kl_coef=2.0)
    assert torch.allclose(t.loss, t.recon + 2.0 * sampled_kl)


def test_the_trainer_tells_beta_tcvae_its_training_set_size(digits) -> None:
    result = train(tiny(model="beta_tcvae", epochs=1), digits, progress=False)
    assert float(result.model.dataset_size) == 256  # max_train_samples
    assert all(math.isfinite(v) for v in result.history[0].values())


# --- the MMD families -----------------------------------------------------------------------------


def test_mmd_by_hand() -> None:
    z, p = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [2.0]])
    # imq with K = 1, one scale: C = 2, k(a, b) = 2 / (2 + d^2)
    # within z: 2/3; within p: 1/3; across: (1 + 1/3 + 2/3 + 2/3) / 4 = 2/3
    assert mmd(z, p, "imq", [1.0]).item() == pytest.approx(2 / 3 + 1 / 3 - 2 * 2 / 3)
    # rbf: exp(-d^2 / 2)
    e = math.exp
    expected = e(-0.5) + e(-2.0) - 2 * (1 + e(-2.0) + e(-0.5) + e(-0.5)) / 4
    assert mmd(z, p, "rbf", [1.0]).item() == pytest.approx(expected)
    # scales add up
    assert mmd(z, p, "imq", [1.0, 2.0]).item() == pytest.approx(
        mmd(z, p, "imq", [1.0]).item() + mmd(z, p, "imq", [2.0]).item())
    g = torch.Generator().manual_seed(0)
    same = mmd(torch.randn(500, 3, generator=g), torch.randn(500, 3, generator=g), "imq", [1.0])
    shifted = mmd(torch.randn(500, 3, generator=g) + 1.0, torch.randn(500, 3, generator=g), "imq", [1.0])
    assert abs(same.item()) < 0.01 < shifted.item()


def test_wae_objective_and_what_it_is() -> None:
    torch.manual_seed(0)
    model = build_model("wae_mmd", "mlp", in_shape=(1, 4, 4), latent_dim=3, family_options={"weight": 7.0})
    assert not model.stochastic and model.generative and model.eps_shape(5) == (5, 3)
    x, prior_z = torch.rand(5, 1, 4, 4), torch.randn(5, 3)
    out = model(x, prior_z)
    assert torch.equal(out.z, model.encode(x).mean)  # a deterministic encoder
    t = model.terms(out, x, likelihood="gaussian", recon_scale=1.0, kl_coef=0.5)
    penalty = mmd(out.z, prior_z, "imq", [0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0])
    assert torch.allclose(t.kl, penalty.expand(5)) and torch.allclose(t.loss, t.recon + 0.5 * 7.0 * penalty)


def test_info_vae_objective_and_its_options() -> None:
    torch.manual_seed(0)
    opts = {"alpha": 0.25, "weight": 10.0, "kernel": "imq", "scales": [1.0]}
    model = build_model("info_vae", "mlp", in_shape=(1, 4, 4), latent_dim=3, family_options=opts)
    assert model.stochastic and model.eps_shape(5) == (2, 5, 3)
    x, eps = torch.rand(5, 1, 4, 4), torch.randn(2, 5, 3)
    out = model(x, eps)
    post = model.encode(x)
    assert torch.allclose(out.z, post.mean + torch.exp(0.5 * post.logvar) * eps[0])
    t = model.terms(out, x, likelihood="bernoulli", recon_scale=1.0, kl_coef=1.0)
    kl = 0.5 * (post.mean.pow(2) + post.logvar.exp() - 1 - post.logvar).sum(1)
    expected = t.recon + 0.75 * kl + 9.25 * mmd(out.z, eps[1], "imq", [1.0])
    assert torch.allclose(t.kl, kl) and torch.allclose(t.loss, expected)
    with pytest.raises(ValueError, match="alpha \\+ weight must be >= 1"):
        RunSettings(model="info_vae", family_options={"info_vae": {"alpha": 0.0, "weight": 0.5}})


# --- vq_vae ----------------------------------------------------------------------------------------


def vq(ema: bool = False, **opts) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("vq_vae", "mlp", in_shape=(1, 2, 2), latent_dim=4, arch_options={"hidden": [3]},
                        family_options={"codebook_size": 3, "code_dim": 2, "commitment": 0.25, "ema": ema, **opts})
    with torch.no_grad():
        model.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [-2.0, 0.0]]))
        if ema:
            model.ema_sum.copy_(model.codebook)  # counts are 1: the sums are the entries
        model.to_mean.weight.zero_()
        model.to_mean.bias.copy_(torch.tensor([0.9, 1.2, -1.5, 0.1]))  # z_e = this, whatever x
    return model


def test_vq_quantises_to_the_nearest_entry_and_its_loss_by_hand() -> None:
    model = vq()
    x = torch.rand(2, 1, 2, 2)
    out = model(x)
    assert out.posterior.codes.tolist() == [[1, 2], [1, 2]]  # (0.9, 1.2) -> (1, 1); (-1.5, 0.1) -> (-2, 0)
    assert torch.equal(out.posterior.mean, torch.tensor([[1.0, 1.0, -2.0, 0.0]] * 2))
    assert torch.allclose(out.z, out.posterior.mean)  # the decoder sees z_q ...
    sq = 0.1 ** 2 + 0.2 ** 2 + 0.5 ** 2 + 0.1 ** 2  # |z_e - z_q|^2
    t = model.terms(out, x, likelihood="bernoulli", recon_scale=1.0, kl_coef=1.0)
    assert torch.allclose(t.kl, torch.full((2,), 1.25 * sq)) and torch.allclose(t.loss, t.recon + t.kl)
    t.loss.sum().backward()
    # ... and passes its gradient on to z_e (straight-through); the codebook learns only its used entries
    assert model.to_mean.bias.grad.abs().sum() > 0
    assert model.codebook.grad[0].abs().sum() == 0 and model.codebook.grad[1:].abs().sum() > 0
    # the codebook term's gradient on entry 1: d/de |sg[z_e] - e|^2 = 2 (e - z_e), for both images
    recon_free = model.codebook.grad[1]
    assert torch.allclose(recon_free, 2 * 2 * (torch.tensor([1.0, 1.0]) - torch.tensor([0.9, 1.2])))


def test_vq_ema_updates_the_codebook_by_hand() -> None:
    model = vq(ema=True, decay=0.5)
    assert "codebook" not in dict(model.named_parameters()) and "codebook" in model.state_dict()
    model.train()
    out = model(torch.rand(2, 1, 2, 2))
    # counts start at 1 with the initial entries as their sums; entry 1 and 2 each got 2 codes
    count = torch.tensor([0.5, 0.5 + 0.5 * 2, 0.5 + 0.5 * 2])
    sums = torch.tensor([[0.0, 0.0], [0.5 + 0.5 * 1.8, 0.5 + 0.5 * 2.4], [-1.0 - 0.5 * 3.0, 0.0 + 0.5 * 0.2]])
    smoothed = (count + 1e-5) / (count.sum() + 3e-5) * count.sum()
    assert torch.allclose(model.ema_count, count) and torch.allclose(model.ema_sum, sums)
    assert torch.allclose(model.codebook, sums / smoothed.unsqueeze(1))
    t = model.terms(out, torch.rand(2, 1, 2, 2), likelihood="bernoulli", recon_scale=1.0, kl_coef=1.0)
    sq = 0.1 ** 2 + 0.2 ** 2 + 0.5 ** 2 + 0.1 ** 2
    assert torch.allclose(t.kl, torch.full((2,), 0.25 * sq))  # commitment only: no codebook term
    before = model.codebook.clone()
    model.eval()
    model(torch.rand(2, 1, 2, 2))
    assert torch.equal(model.codebook, before)  # no updates in eval mode


def test_vq_options_fit_the_latent_size() -> None:
    with pytest.raises(ValidationError, match="latent_dim 6 is not a multiple of family_options.vq_vae.code_dim 4; "
                                              "allowed code_dim: 1, 2, 3, 6"):
        RunSettings(model="vq_vae", latent_dim=6)
    assert RunSettings(model="vq_vae", latent_dim=6, family_options={"vq_vae": {"code_dim": 3}}).family_config == {
        "codebook_size": 512, "code_dim": 3, "commitment": 0.25, "ema": False, "decay": 0.99}
    with pytest.raises(ValueError, match="not a multiple"):
        build_model("vq_vae", "mlp", in_shape=(1, 4, 4), latent_dim=6)


def test_codebook_metrics_by_hand() -> None:
    m = codebook_metrics(torch.tensor([5, 5, 0, 0]))
    assert m == {"codebook_perplexity": pytest.approx(2.0), "dead_codes": 2.0, "codebook_usage": 0.5}
    assert codebook_metrics(torch.tensor([1, 1, 1, 1]))["codebook_perplexity"] == pytest.approx(4.0)


def test_vq_vae_is_evaluated_on_reconstruction_codebook_and_clustering(digits) -> None:
    s = tiny(model="vq_vae", family_options={"vq_vae": {"codebook_size": 16, "code_dim": 2}})
    model = train(s, digits, progress=False).model
    test = to_device(digits.test, torch.device("cpu"), image_size=None, binarization="none")
    tr = to_device(digits.train, torch.device("cpu"), image_size=None, binarization="none")
    ev = evaluate(model, test, s, EvaluateSettings(clustering=True, kmeans_restarts=2), train=tr, num_classes=10)
    m = ev.metrics
    assert "elbo" not in m and "nll_iw" not in m and "elbo" in ev.not_applicable
    assert 1.0 <= m["codebook_perplexity"] <= 16 and m["dead_codes"] == 16 * (1 - m["codebook_usage"])
    assert {"recon_mse", "recon_bce", "kmeans_acc", "knn_acc"} <= set(m)
    with torch.no_grad():  # the codes clustered are the quantised ones: codebook entries
        post = model.encode(test.batch(torch.arange(10)))
        assert torch.equal(post.mean.view(10, -1, 2), model.codebook[post.codes])


# --- options as run settings ------------------------------------------------------------------------


def test_family_options_count_for_the_chosen_family_only() -> None:
    both = {"iwae": {"k": 3}, "vq_vae": {"codebook_size": 8}}
    assert RunSettings(model="iwae", family_options=both).family_options == {"iwae": {"k": 3, "objective": "iwae"}}
    assert RunSettings(model="vae", family_options=both).family_options == {}
    assert run_key(RunSettings(model="vae", family_options=both)) == run_key(RunSettings(model="vae"))
    assert run_key(RunSettings(model="iwae", family_options={"iwae": {"k": 5}})) == run_key(RunSettings(model="iwae"))
    assert run_key(RunSettings(model="iwae", family_options={"iwae": {"k": 3}})) != run_key(RunSettings(model="iwae"))
    with pytest.raises(ValidationError, match=r"iwae.kk: unknown option; allowed: k"):
        RunSettings(model="iwae", family_options={"iwae": {"kk": 3}})
    with pytest.raises(ValidationError, match=r"options for unknown model family 'gan'; allowed: ae, beta_tcvae"):
        RunSettings(family_options={"gan": {}})
    with pytest.raises(ValidationError, match="iwae.k"):
        RunSettings(model="iwae", family_options={"iwae": {"k": 0}})


def test_per_member_options_share_a_pack_and_shape_options_do_not() -> None:
    def key(model: str, **opts) -> str:
        return pack_key(RunSettings(model=model, family_options={model: opts}))

    assert key("beta_tcvae", beta=1.0) == key("beta_tcvae", beta=6.0, alpha=0.5, gamma=2.0)
    assert key("vq_vae", commitment=0.1, decay=0.9) == key("vq_vae", commitment=1.0)
    assert key("wae_mmd", weight=1.0) == key("wae_mmd", weight=100.0)
    assert key("info_vae", alpha=0.5, weight=2.0) == key("info_vae")
    assert key("iwae", k=1) != key("iwae", k=5)
    assert key("vq_vae", codebook_size=8) != key("vq_vae") != key("vq_vae", ema=True)
    assert key("wae_mmd", kernel="rbf") != key("wae_mmd")


def test_a_matrix_over_families_names_and_keys_its_cells(write_yaml) -> None:
    specs = expand(load_experiment(write_yaml("""
        name: f
        defaults: {dataset: digits}
        matrix:
          model: [vae, iwae]
          family_options.iwae.k: [1, 5, 50]
        """)))
    # the k axis means nothing to vae: its three cells are one
    assert sorted(s.name for s in specs) == ["iwae-mlp-z16-b1-sum-digits-k1-s0", "iwae-mlp-z16-b1-sum-digits-k5-s0",
                                             "iwae-mlp-z16-b1-sum-digits-k50-s0", "vae-mlp-z16-b1-sum-digits-k1-s0"]


def test_every_family_runs_end_to_end_and_logs_what_applies(write_yaml) -> None:
    import mlflow

    from vaebench.cli import main

    path = write_yaml("""
        name: families
        defaults:
          dataset: digits
          epochs: 1
          batch_size: 64
          max_train_samples: 256
          latent_dim: 4
          arch_options: {mlp: {hidden: [32]}}
          family_options: {vq_vae: {codebook_size: 16, code_dim: 2}, iwae: {k: 3}}
        evaluate: {iw_samples: 8, max_test_samples: 100, probe_train_samples: 200, silhouette_samples: 50,
                   kmeans_restarts: 1, latent_projection: pca}
        matrix:
          model: [iwae, beta_tcvae, wae_mmd, info_vae, vq_vae]
        include:
          - {model: vae, prior: {kind: vamp, pseudo_inputs: 8}}
        """)
    assert main(["run", str(path), "--no-progress"]) == 0
    mlflow.set_tracking_uri(load_experiment(path).resolved_tracking_uri())
    runs = mlflow.search_runs(experiment_names=["families"])
    cells = runs[runs["tags.vaebench.kind"] == "cell"].set_index("tags.model")
    assert set(cells["status"]) == {"FINISHED"} and len(cells) == 6
    client = mlflow.MlflowClient()
    for model, row in cells.iterrows():
        figures = {a.path.split("/")[-1] for a in client.list_artifacts(row["run_id"], "figures")}
        stochastic = model in ("iwae", "beta_tcvae", "info_vae", "vae")
        assert (row["metrics.test/nll_iw"] <= -row["metrics.test/elbo"]) if stochastic else \
            "test/elbo" in row["tags.vaebench.not_applicable"]
        assert ("samples.png" in figures) == (model != "vq_vae"), model  # wae_mmd samples its prior
        assert row["metrics.test/knn_acc"] > 0
    assert cells.loc["vq_vae", "metrics.test/codebook_perplexity"] >= 1
    assert cells.loc["iwae", "params.family_options.iwae.k"] == "3"
    assert cells.loc["vae", "params.prior.kind"] == "vamp"


def test_tuning_a_family_option_needs_that_family(write_yaml) -> None:
    text = """
        name: t
        defaults: {dataset: digits}
        matrix: {model: [MODEL]}
        tune:
          metric: test/elbo
          direction: maximize
          space:
            family_options.iwae.k: {low: 1, high: 10}
        """
    with pytest.raises(ConfigError, match="has no effect: the cell's model is 'vae', not 'iwae'"):
        load_experiment(write_yaml(text.replace("MODEL", "vae")))
    exp = load_experiment(write_yaml(text.replace("MODEL", "iwae"), "iwae.yaml"))
    assert exp.tune.space["family_options.iwae.k"].type == "int"
