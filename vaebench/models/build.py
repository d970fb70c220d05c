"""The registries of families and architectures, and `build_model`, the one way callers construct a
model. A new family is a module under vaebench/models/ and one line in FAMILIES."""

from collections.abc import Mapping

from pydantic import BaseModel
from torch import nn

from vaebench.models.common import Arch, Shape
from vaebench.models.conv import (
    ConvOptions,
    DeepConvOptions,
    conv_decoder,
    conv_encoder,
    deep_conv_decoder,
    deep_conv_encoder,
)
from vaebench.models.beta_tcvae import BetaTCVAE
from vaebench.models.families import AE, DAE, VAE, AutoEncoder
from vaebench.models.info_vae import InfoVAE
from vaebench.models.iwae import IWAE
from vaebench.models.mlp import MLPDecoder, MLPEncoder, MLPOptions
from vaebench.models.vq_vae import VQVAE
from vaebench.models.wae import WAE

FAMILIES: dict[str, type[AutoEncoder]] = {
    "ae": AE,
    "vae": VAE,
    "dae": DAE,
    "iwae": IWAE,  # Burda et al. 2015
    "beta_tcvae": BetaTCVAE,  # Chen et al. 2018
    "wae_mmd": WAE,  # Tolstikhin et al. 2018
    "info_vae": InfoVAE,  # Zhao et al. 2019
    "vq_vae": VQVAE,  # van den Oord et al. 2017
}

ARCHS: dict[str, Arch] = {
    "mlp": Arch(MLPOptions, MLPEncoder, MLPDecoder),
    "conv": Arch(ConvOptions, conv_encoder, conv_decoder),
    "deep_conv": Arch(DeepConvOptions, deep_conv_encoder, deep_conv_decoder),
}


def build_model(
    family: str,
    arch: str,
    *,
    in_shape: Shape,
    latent_dim: int,
    arch_options: Mapping | BaseModel | None = None,
    noise: float = 0.0,
    learn_sigma: bool = False,
    family_options: Mapping | BaseModel | None = None,
    prior: str = "standard",
    pseudo_inputs: int = 500,
) -> AutoEncoder:
    """Build `family` on `arch` for images of `in_shape` (C, H, W) with a `latent_dim`-dim latent.

    arch_options / family_options: a dict validated by `ARCHS[arch].options` /
    `FAMILIES[family].Options` (pydantic ValidationError on unknown keys or bad values), or an
    already validated instance of that model. `prior`: a prior the family supports
    (`FAMILIES[family].priors`), with `pseudo_inputs` components for the VampPrior.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; allowed: {', '.join(FAMILIES)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; allowed: {', '.join(ARCHS)}")
    shape = tuple(in_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"in_shape must be three positive ints (C, H, W), got {in_shape!r}")
    if not isinstance(latent_dim, int) or latent_dim < 1:
        raise ValueError(f"latent_dim must be a positive int, got {latent_dim!r}")
    spec = ARCHS[arch]
    opts = spec.options.model_validate({} if arch_options is None else arch_options)
    encoder: nn.Module = spec.encoder(shape, opts)
    decoder: nn.Module = spec.decoder(shape, latent_dim, opts)
    return FAMILIES[family](
        encoder, decoder, in_shape=shape, latent_dim=latent_dim, noise=noise, learn_sigma=learn_sigma,
        options=family_options, prior=prior, pseudo_inputs=pseudo_inputs,
    )
