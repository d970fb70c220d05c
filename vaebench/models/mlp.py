"""`mlp`: flatten, a stack of fully connected layers, and the mirror image back."""

import math

from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import Tensor, nn

from vaebench.models.common import ACTIVATIONS, Activation, Shape


class MLPOptions(BaseModel):
    """Options of the `mlp` architecture.

    hidden: widths of the encoder's hidden layers, input side first (e.g. [512], or [400, 400]);
        the decoder uses the same widths in reverse order.
    activation: nonlinearity after every hidden layer, in both encoder and decoder.
    """

    model_config = ConfigDict(extra="forbid")

    hidden: list[PositiveInt] = Field(default=[512], min_length=1)
    activation: Activation = "relu"


class MLPEncoder(nn.Module):
    """(B, C, H, W) -> (B, hidden[-1])."""

    def __init__(self, in_shape: Shape, opts: MLPOptions) -> None:
        super().__init__()
        act = ACTIVATIONS[opts.activation]
        widths = [math.prod(in_shape), *opts.hidden]
        layers: list[nn.Module] = [nn.Flatten()]  # (B, C*H*W)
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), act()]
        self.net = nn.Sequential(*layers)
        self.out_features = widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MLPDecoder(nn.Module):
    """(B, K) -> (B, C, H, W) logits; no activation on the output layer."""

    def __init__(self, in_shape: Shape, latent_dim: int, opts: MLPOptions) -> None:
        super().__init__()
        act = ACTIVATIONS[opts.activation]
        widths = [latent_dim, *reversed(opts.hidden)]
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), act()]
        layers += [nn.Linear(widths[-1], math.prod(in_shape)), nn.Unflatten(1, tuple(in_shape))]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)
