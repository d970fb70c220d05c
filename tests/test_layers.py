"""Layering: lower modules never import the ones above them (config -> matrix -> runner / tune ->
cli). The config layer validates the whole file, `tune:` included, without the tuner."""

from __future__ import annotations

import subprocess
import sys


def test_config_does_not_import_the_tuner(write_yaml) -> None:
    # validating a `tune:` section (sampler options included) needs nothing from vaebench.tune
    path = write_yaml("""
    name: x
    defaults: {dataset: digits}
    matrix: {model: [vae]}
    tune:
      metric: test/elbo
      direction: maximize
      space:
        beta: {low: 0.5, high: 4.0}
      sampler_options: {n_startup_trials: 3}
    """)
    code = ("import sys; from vaebench.config import load_experiment; load_experiment(sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m.startswith('vaebench.tune')))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_tuner_uses_the_helpers_and_registries_of_the_config_layer() -> None:
    from vaebench import config, tune
    from vaebench.tune import plan, space, storage

    assert tune.SAMPLERS is config.SAMPLERS and tune.PRUNERS is config.PRUNERS
    assert storage.SAMPLERS is config.SAMPLERS
    assert plan.tune_base_settings is config.tune_base_settings and space.param_kind is config.param_kind


def test_the_schema_is_the_bottom_and_the_loader_sits_above_the_matrix() -> None:
    code = ("import sys; import vaebench.matrix; "
            "print(sorted(m for m in sys.modules if m.startswith('vaebench.') and m != 'vaebench.matrix'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = eval(out)  # noqa: S307 - a list literal we printed ourselves
    assert "vaebench.config.schema" in loaded and "vaebench.config.loader" not in loaded
    assert not [m for m in loaded if m.startswith(("vaebench.runner", "vaebench.tune", "vaebench.units"))]
