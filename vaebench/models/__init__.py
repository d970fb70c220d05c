"""Autoencoder families x architectures; build one with `build_model(family, arch, ...)`."""

from vaebench.models.build import ARCHS, build_model
from vaebench.models.common import Arch
from vaebench.models.families import FAMILIES, AutoEncoder, Output, Posterior

__all__ = ["ARCHS", "FAMILIES", "Arch", "AutoEncoder", "Output", "Posterior", "build_model"]
