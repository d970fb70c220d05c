"""vaebench: one YAML matrix -> trained, evaluated, MLflow-tracked autoencoders and VAEs.

Nothing heavy is imported here, so `vaebench --help` stays instant.
"""

__version__ = "0.1.0"
