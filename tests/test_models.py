"""Models: every family x arch builds, has exact shapes, trains one step; options and registries validate."""

import copy

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from vaebench.models import ARCHS, FAMILIES, AutoEncoder, Output, build_model

B, K = 4, 8


def train_step(model: AutoEncoder, x: torch.Tensor) -> float:
    """One Adam step on the family's own objective (Bernoulli likelihood, sum reduction, beta 1);
    returns the loss."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    out = model(model.corrupt(x))
    loss = model.terms(out, x, likelihood="bernoulli", recon_scale=1.0, kl_coef=1.0).loss.mean()
    if family_of(model) == "vae":  # the family's objective is the textbook one: BCE + closed-form KL
        mean, logvar = out.posterior.mean, out.posterior.logvar
        textbook = F.binary_cross_entropy_with_logits(out.logits, x, reduction="sum") / len(x) \
            + 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean()
        assert torch.allclose(loss, textbook, rtol=1e-5)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def family_of(model: AutoEncoder) -> str:
    return next(name for name, cls in FAMILIES.items() if type(model) is cls)


def check_model(family: str, arch: str, shape: tuple[int, int, int], **kwargs) -> None:
    torch.manual_seed(0)
    model = build_model(family, arch, in_shape=shape, latent_dim=K, noise=0.2, **kwargs)
    x = torch.rand(B, *shape)
    out = model(x)
    assert isinstance(out, Output)
    lead = tuple(out.logits.shape[:-4])  # iwae decodes k samples per image: (k,)
    assert lead == ((model.options.k,) if family == "iwae" else ())
    assert out.logits.shape[-4:] == (B, *shape)
    assert out.z.shape == (*lead, B, K) and out.posterior.mean.shape == (B, K)
    assert (out.posterior.logvar is None) == (not model.stochastic)
    if model.stochastic:
        assert out.posterior.logvar.shape == (B, K)
    before = copy.deepcopy(model.state_dict())
    loss = train_step(model, x)
    assert torch.isfinite(torch.tensor(loss))
    for name, p in model.named_parameters():  # every parameter is wired into the loss
        assert not torch.equal(p.detach(), before[name]), name


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32, 64])
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_arch_shapes_and_step(family: str, arch: str, size: int, channels: int) -> None:
    check_model(family, arch, (channels, size, size))


@pytest.mark.parametrize("arch", ["mlp", "conv", "deep_conv"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_8x8(family: str, arch: str) -> None:
    check_model(family, arch, (1, 8, 8))


@pytest.mark.parametrize("shape", [(1, 7, 7), (3, 28, 32), (1, 9, 13)])
@pytest.mark.parametrize("options", [{"kernel_size": 4}, {"kernel_size": 3}, {"channels": [8, 16, 32, 64, 128]}])
def test_conv_odd_and_nonsquare_sizes(shape: tuple[int, int, int], options: dict) -> None:
    model = build_model("ae", "conv", in_shape=shape, latent_dim=K, arch_options=options)
    assert model(torch.rand(2, *shape)).logits.shape == (2, *shape)


def test_deep_conv_caps_layers_at_1x1() -> None:
    small = build_model("ae", "deep_conv", in_shape=(1, 8, 8), latent_dim=K)
    assert small.encoder.channels == [32, 64, 128]  # 8 -> 4 -> 2 -> 1
    assert small.encoder.out_features == 128
    big = build_model("ae", "deep_conv", in_shape=(1, 28, 28), latent_dim=K)
    assert big.encoder.channels == [32, 64, 128, 256, 512]  # 28 -> 14 -> 7 -> 4 -> 2 -> 1


def test_conv_too_small_and_capping() -> None:
    with pytest.raises(ValueError, match=r"'conv'.*1x5"):
        build_model("ae", "conv", in_shape=(1, 1, 5), latent_dim=K)  # kernel 4 turns a side of 1 into 0
    capped = build_model("ae", "conv", in_shape=(1, 28, 32), latent_dim=K, arch_options={"channels": [4] * 6})
    assert capped.encoder.channels == [4] * 4  # 28 -> 14 -> 7 -> 3 -> 1, a fifth conv would give 0


def test_vae_forward_samples() -> None:
    torch.manual_seed(0)
    model = build_model("vae", "mlp", in_shape=(1, 8, 8), latent_dim=K).eval()
    x = torch.rand(B, 1, 8, 8)
    a, b = model(x), model(x)
    assert not torch.equal(a.z, b.z)
    assert torch.equal(a.posterior.mean, b.posterior.mean)
    assert model.sample_prior(5).shape == (5, K)


@pytest.mark.parametrize("family", ["ae", "dae"])
def test_deterministic_forward_in_eval(family: str) -> None:
    model = build_model(family, "deep_conv", in_shape=(1, 28, 28), latent_dim=K, noise=0.5).eval()
    x = torch.rand(B, 1, 28, 28)
    a, b = model(x), model(x)
    assert torch.equal(a.z, a.posterior.mean)
    assert torch.equal(a.logits, b.logits)


def test_corrupt() -> None:
    x = torch.rand(B, 1, 28, 28)
    dae = build_model("dae", "mlp", in_shape=(1, 28, 28), latent_dim=K, noise=0.5)
    noisy = dae.corrupt(x)
    assert noisy.shape == x.shape and not torch.equal(noisy, x)
    assert noisy.min() >= 0 and noisy.max() <= 1
    for family in ["ae", "vae"]:
        model = build_model(family, "mlp", in_shape=(1, 28, 28), latent_dim=K)
        assert model.corrupt(x) is x
    with pytest.raises(ValueError, match="noise"):
        build_model("dae", "mlp", in_shape=(1, 28, 28), latent_dim=K, noise=-0.1)


def test_learn_sigma() -> None:
    model = build_model("vae", "mlp", in_shape=(1, 8, 8), latent_dim=K, learn_sigma=True)
    assert isinstance(model.log_sigma, nn.Parameter) and model.log_sigma.shape == ()
    assert any(p is model.log_sigma for p in model.parameters())
    assert build_model("vae", "mlp", in_shape=(1, 8, 8), latent_dim=K).log_sigma is None


def test_mlp_hidden_layers() -> None:
    model = build_model("ae", "mlp", in_shape=(1, 28, 28), latent_dim=K, arch_options={"hidden": [400, 400]})
    enc = [tuple(m.weight.shape) for m in model.encoder.modules() if isinstance(m, nn.Linear)]
    dec = [tuple(m.weight.shape) for m in model.decoder.modules() if isinstance(m, nn.Linear)]
    assert enc == [(400, 784), (400, 400)]
    assert dec == [(400, K), (400, 400), (784, 400)]
    assert model.to_mean.weight.shape == (K, 400)


@pytest.mark.parametrize(
    ("arch", "options"),
    [
        ("mlp", {"hiden": [512]}),
        ("mlp", {"hidden": []}),
        ("mlp", {"hidden": [0]}),
        ("mlp", {"activation": "swish"}),
        ("conv", {"kernel_size": 5}),
        ("conv", {"channels": [32, -1]}),
        ("conv", {"hidden": [512]}),
        ("deep_conv", {"channels": []}),
        ("deep_conv", {"kernel_size": 3}),
    ],
)
def test_bad_options_rejected(arch: str, options: dict) -> None:
    with pytest.raises(ValidationError):
        ARCHS[arch].options.model_validate(options)
    with pytest.raises(ValidationError):
        build_model("ae", arch, in_shape=(1, 28, 28), latent_dim=K, arch_options=options)


def test_validated_options_instance_accepted() -> None:
    opts = ARCHS["conv"].options(channels=[8, 16])
    model = build_model("ae", "conv", in_shape=(1, 28, 28), latent_dim=K, arch_options=opts)
    assert model.encoder.channels == [8, 16]


@pytest.mark.parametrize(
    ("family", "arch", "expected"),
    [("gan", "mlp", ["'gan'", "ae", "vae", "dae"]), ("vae", "resnet", ["'resnet'", "mlp", "conv", "deep_conv"])],
)
def test_unknown_names(family: str, arch: str, expected: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        build_model(family, arch, in_shape=(1, 28, 28), latent_dim=K)
    for text in expected:  # the bad name and every allowed one
        assert text in str(err.value)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_state_dict_roundtrip(family: str, tmp_path) -> None:
    kwargs = dict(in_shape=(3, 32, 32), latent_dim=K, learn_sigma=True)
    torch.manual_seed(0)
    model = build_model(family, "deep_conv", **kwargs)
    x = torch.rand(B, 3, 32, 32)
    train_step(model, x)  # move BatchNorm running stats away from their defaults
    model.eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(1)
    fresh = build_model(family, "deep_conv", **kwargs)
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    fresh.eval()
    pa, pb = model.encode(x), fresh.encode(x)
    assert torch.equal(pa.mean, pb.mean)
    assert torch.equal(model.decode(pa.mean), fresh.decode(pb.mean))
    assert torch.equal(model.log_sigma, fresh.log_sigma)
    torch.manual_seed(2)
    za = model(x).z
    torch.manual_seed(2)
    assert torch.equal(za, fresh(x).z)
