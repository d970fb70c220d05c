"""Autoencoder families x architectures; build one with `build_model(family, arch, ...)`."""

from vaebench.models.build import ARCHS, FAMILIES, build_model
from vaebench.models.common import Arch
from vaebench.models.families import AutoEncoder, Output, Posterior

__all__ = ["ARCHS", "FAMILIES", "Arch", "AutoEncoder", "Output", "Posterior", "build_model"]
