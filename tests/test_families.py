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
from vaebench.evaluate import evaluate, importance_weighted, iw_nll
from vaebench.losses import log_normal_diag, log_normal_std
from vaebench.matrix import expand
from vaebench.models import ARCHS, FAMILIES, build_model
from vaebench.models import priors as priors_module
from vaebench.train import train

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
    with pytest.raises(ValidationError, match=r"prior.kind 'vamp' is not available for model 'ae'; allowed models: vae"):
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
    with pytest.raises(ConfigError, match="not available for model 'ae'"):
        load_experiment(write_yaml(path.read_text().replace("exclude:\n  - {model: ae, prior.kind: vamp}", ""),
                                   "bad.yaml"))
