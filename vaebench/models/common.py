"""Pieces shared by the architectures: the activation registry and the `Arch` record."""

from dataclasses import dataclass
from functools import partial
from typing import Callable, Literal, get_args

from pydantic import BaseModel
from torch import nn

Shape = tuple[int, int, int]  # (C, H, W)

Activation = Literal["relu", "leaky_relu", "leaky_relu_0.2", "elu", "gelu", "tanh"]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,  # torch's default slope 0.01
    "leaky_relu_0.2": partial(nn.LeakyReLU, 0.2),  # the slope of DCGAN and of most VAE recipes
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
}
# the options models validate against the Literal, the builders look up the dict: keep them in step
assert set(get_args(Activation)) == set(ACTIVATIONS)


@dataclass(frozen=True)
class Arch:
    """One architecture: its options model and the two builders.

    encoder(in_shape, options) -> module mapping (B, C, H, W) -> (B, F), with `.out_features == F`
    decoder(in_shape, latent_dim, options) -> module mapping (B, K) -> (B, C, H, W) logits
    """

    options: type[BaseModel]
    encoder: Callable[[Shape, BaseModel], nn.Module]
    decoder: Callable[[Shape, int, BaseModel], nn.Module]
