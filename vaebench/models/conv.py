"""`conv` and `deep_conv`: stride-2 convolutions down, stride-2 transposed convolutions back up.

Both share one encoder/decoder pair; they differ in kernel size, normalisation and activation.
The decoder retraces the encoder's spatial sizes exactly (28 -> 14 -> 7 -> 14 -> 28, also for odd
sizes), by choosing each transposed conv's output_padding from the sizes the encoder produced.
"""

from functools import partial
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import Tensor, nn

from vaebench.models.common import ACTIVATIONS, Activation, Shape

PADDING = 1  # every conv here is stride 2, padding 1


def stride2_sizes(hw: tuple[int, int], n_layers: int, kernel_size: int, arch: str) -> list[tuple[int, int]]:
    """Spatial (h, w) of the input and after each stride-2 conv, input first.

    Stops early once the map is 1x1 (further layers could only convolve a single pixel) or the next
    conv would shrink a side to 0; the caller drops the channels that did not fit. This is what lets
    8x8 digits use the 5-layer deep_conv default. Raises ValueError if not even one conv fits.
    """
    sizes = [hw]
    for _ in range(n_layers):
        h, w = ((s + 2 * PADDING - kernel_size) // 2 + 1 for s in sizes[-1])
        if sizes[-1] == (1, 1) or h < 1 or w < 1:
            break
        sizes.append((h, w))
    if len(sizes) == 1:
        raise ValueError(
            f"arch {arch!r}: a {hw[0]}x{hw[1]} image is too small for a stride-2 conv with kernel_size={kernel_size}"
        )
    return sizes


class ConvEncoder(nn.Module):
    """(B, C, H, W) -> (B, F): [conv(stride 2) -> (BatchNorm) -> act] per channel width, then flatten."""

    def __init__(
        self,
        in_shape: Shape,
        channels: list[int],
        kernel_size: int,
        act: Callable[[], nn.Module],
        batchnorm: bool,
        arch: str,
    ) -> None:
        super().__init__()
        c, h, w = in_shape
        sizes = stride2_sizes((h, w), len(channels), kernel_size, arch)
        self.channels = list(channels[: len(sizes) - 1])  # the widths actually used (see stride2_sizes)
        widths = [c, *self.channels]
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            # a bias right before BatchNorm is cancelled by the mean subtraction: leave it out
            layers.append(nn.Conv2d(a, b, kernel_size, stride=2, padding=PADDING, bias=not batchnorm))
            layers += [nn.BatchNorm2d(b), act()] if batchnorm else [act()]
        layers.append(nn.Flatten())  # (B, channels[-1] * h' * w')
        self.net = nn.Sequential(*layers)
        self.out_features = widths[-1] * sizes[-1][0] * sizes[-1][1]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """(B, K) -> (B, C, H, W) logits: linear -> act -> reshape -> transposed convs mirroring ConvEncoder.

    Every transposed conv but the last is followed by (BatchNorm) -> act; the last maps to C channels raw.
    """

    def __init__(
        self,
        in_shape: Shape,
        latent_dim: int,
        channels: list[int],
        kernel_size: int,
        act: Callable[[], nn.Module],
        batchnorm: bool,
        arch: str,
    ) -> None:
        super().__init__()
        c, h, w = in_shape
        sizes = stride2_sizes((h, w), len(channels), kernel_size, arch)
        widths = [*reversed(channels[: len(sizes) - 1]), c]  # e.g. [64, 32, C]
        h0, w0 = sizes[-1]
        layers: list[nn.Module] = [
            nn.Linear(latent_dim, widths[0] * h0 * w0),
            act(),
            nn.Unflatten(1, (widths[0], h0, w0)),  # (B, channels[-1], h', w')
        ]
        n = len(widths) - 1
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            src, dst = sizes[n - i], sizes[n - i - 1]
            # a transposed conv gives 2*(s-1) - 2*padding + kernel + output_padding; pad up to exactly dst
            pad = tuple(d - (2 * (s - 1) - 2 * PADDING + kernel_size) for s, d in zip(src, dst))
            assert all(0 <= p < 2 for p in pad), (src, dst, pad)
            last = i == n - 1
            layers.append(
                nn.ConvTranspose2d(
                    a, b, kernel_size, stride=2, padding=PADDING, output_padding=pad, bias=last or not batchnorm
                )
            )
            if not last:
                layers += [nn.BatchNorm2d(b), act()] if batchnorm else [act()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class ConvOptions(BaseModel):
    """Options of the `conv` architecture: plain stride-2 convs, no normalisation.

    channels: encoder widths, input side first, one stride-2 conv each; the decoder mirrors them.
        Layers stop once the feature map is 1x1 or the next conv would shrink a side to 0; the
        remaining trailing widths are then dropped (`encoder.channels` lists the widths used).
    kernel_size: 4 halves even sizes exactly (28 -> 14 -> 7 -> 3), 3 rounds up (7 -> 4); either way
        the decoder reproduces the input size exactly.
    activation: nonlinearity after every conv / transposed conv except the decoder's last.
    """

    model_config = ConfigDict(extra="forbid")

    channels: list[PositiveInt] = Field(default=[32, 64], min_length=1)
    kernel_size: Literal[3, 4] = 4
    activation: Activation = "relu"


def conv_encoder(in_shape: Shape, opts: ConvOptions) -> ConvEncoder:
    act = ACTIVATIONS[opts.activation]
    return ConvEncoder(in_shape, opts.channels, opts.kernel_size, act, batchnorm=False, arch="conv")


def conv_decoder(in_shape: Shape, latent_dim: int, opts: ConvOptions) -> ConvDecoder:
    act = ACTIVATIONS[opts.activation]
    return ConvDecoder(in_shape, latent_dim, opts.channels, opts.kernel_size, act, batchnorm=False, arch="conv")


class DeepConvOptions(BaseModel):
    """Options of the `deep_conv` architecture: kernel-3 stride-2 convs, each with BatchNorm and
    LeakyReLU(0.2), mirrored by transposed convs with BatchNorm and LeakyReLU; the final transposed
    conv maps to the image channels without norm or activation.

    channels: encoder widths, input side first, one stride-2 conv each (kernel 3 rounds sizes up:
        28 -> 14 -> 7 -> 4 -> 2 -> 1). Small images: layers stop once the feature map is 1x1 and the
        remaining trailing widths are dropped (`encoder.channels` lists the widths used), so an 8x8
        input with the default widths uses [32, 64, 128] (8 -> 4 -> 2 -> 1); 28, 32, 64 use all five.
    """

    model_config = ConfigDict(extra="forbid")

    channels: list[PositiveInt] = Field(default=[32, 64, 128, 256, 512], min_length=1)


DEEP_CONV_KERNEL = 3
deep_conv_act = partial(nn.LeakyReLU, 0.2)


def deep_conv_encoder(in_shape: Shape, opts: DeepConvOptions) -> ConvEncoder:
    return ConvEncoder(in_shape, opts.channels, DEEP_CONV_KERNEL, deep_conv_act, batchnorm=True, arch="deep_conv")


def deep_conv_decoder(in_shape: Shape, latent_dim: int, opts: DeepConvOptions) -> ConvDecoder:
    return ConvDecoder(
        in_shape, latent_dim, opts.channels, DEEP_CONV_KERNEL, deep_conv_act, batchnorm=True, arch="deep_conv"
    )
