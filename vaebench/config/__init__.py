"""The experiments file: its typed schema (`config.schema`, the bottom of the stack) and its loader
(`config.loader`, which validates a whole file with the help of vaebench.matrix). Everything
other modules use is importable from here; the loader's names are imported when first asked for,
so that the modules below it (matrix) can import the schema from this package without it.
"""

from typing import Any

from vaebench.config.schema import (ENV_DATA_DIR, ENV_TRACKING_URI, IW_SAMPLES_AUTO, MAX_BYTES, MAX_DEPTH, MAX_NODES,
                                    PRUNERS, RESERVED_OPTIONS, SAMPLERS, SETTING_NAMES, STOCHASTIC_METRICS,
                                    ConfigError, EvaluateSettings, Experiment, KLAnneal, LRSchedule, Prior, Reference,
                                    RunSettings, SearchParam, TuneSettings)

LOADER_NAMES = ("check_tune", "load_experiment", "param_kind", "tune_base_settings", "tune_fixed_cell")

__all__ = ["ENV_DATA_DIR", "ENV_TRACKING_URI", "IW_SAMPLES_AUTO", "MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "PRUNERS",
           "RESERVED_OPTIONS", "SAMPLERS", "SETTING_NAMES", "STOCHASTIC_METRICS", "ConfigError", "EvaluateSettings",
           "Experiment", "KLAnneal", "LRSchedule", "Prior", "Reference", "RunSettings", "SearchParam",
           "TuneSettings", *LOADER_NAMES]


def __getattr__(name: str) -> Any:
    if name in LOADER_NAMES:
        from vaebench.config import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'vaebench.config' has no attribute {name!r}")
