"""Matrix expansion (axes x seeds, exclude, include) and stable run keys and names."""

from __future__ import annotations

from vaebench.config import RunSettings, load_experiment
from vaebench.matrix import expand, run_key

BASE = """
name: m
seeds: [0, 1]
defaults: {dataset: digits, epochs: 1}
matrix:
  model: [ae, vae]
  latent_dim: [2, 16]
  beta: [1.0, 4.0]
exclude:
  - {model: ae, beta: 4}
include:
  - {model: dae, latent_dim: 16, noise: 0.3}
"""


def test_expansion_counts_exclude_include_and_seeds(write_yaml) -> None:
    specs = expand(load_experiment(write_yaml(BASE)))
    # (2 models x 2 z x 2 betas - 2 excluded ae/beta4) x 2 seeds + 1 include x 2 seeds
    assert len(specs) == (8 - 2) * 2 + 2
    assert not any(s.settings.model == "ae" and s.settings.beta == 4.0 for s in specs)
    daes = [s for s in specs if s.settings.model == "dae"]
    assert [s.settings.seed for s in daes] == [0, 1] and all(s.settings.noise == 0.3 for s in daes)
    assert len({s.key for s in specs}) == len(specs)


def test_names_follow_the_axis_values(write_yaml) -> None:
    specs = expand(load_experiment(write_yaml(BASE)))
    names = {s.name for s in specs}
    assert "vae-mlp-z16-b4-sum-digits-s1" in names
    assert "dae-mlp-z16-b1-sum-digits-noise0.3-s0" in names



def test_axes_ending_alike_are_named_by_their_whole_path(write_yaml) -> None:
    specs = expand(load_experiment(write_yaml(
        "name: x\ndefaults: {dataset: digits, kl_anneal: {schedule: linear}}\n"
        "matrix:\n  epochs: [4]\n  kl_anneal.epochs: [2]\n  lr_schedule.gamma: [0.5]\n")))
    assert [s.name for s in specs] == ["vae-mlp-z16-b1-sum-digits-epochs4-kl_anneal.epochs2-gamma0.5-s0"]


def test_run_key_ignores_yaml_order_and_number_format(write_yaml) -> None:
    a = expand(load_experiment(write_yaml(BASE, "a.yaml")))
    reordered = """
    include:
      - {noise: 0.3, latent_dim: 16, model: dae}
    exclude:
      - {beta: 4.0, model: ae}
    matrix:
      beta: [4, 1]
      latent_dim: [16, 2]
      model: [vae, ae]
    defaults: {epochs: 1, dataset: digits, batch_size: 128, lr: 0.001}
    seeds: [1, 0]
    name: renamed
    """
    b = expand(load_experiment(write_yaml(reordered, "b.yaml")))
    assert {s.key for s in a} == {s.key for s in b}


def test_run_key_changes_with_any_setting_but_not_device() -> None:
    base = RunSettings(dataset="digits")
    assert run_key(base) == run_key(RunSettings(dataset="digits", device="cpu"))
    assert run_key(base) != run_key(RunSettings(dataset="digits", lr=2e-3))
    assert run_key(base) != run_key(RunSettings(dataset="digits", arch_options={"mlp": {"hidden": [400, 400]}}))
    # options of an architecture the run does not use do not matter
    assert run_key(base) == run_key(RunSettings(dataset="digits", arch_options={"conv": {"channels": [8]}}))


def test_dotted_axis_sets_a_nested_setting(write_yaml) -> None:
    exp = load_experiment(write_yaml("""
    name: d
    defaults: {dataset: digits, kl_anneal: {schedule: linear}}
    matrix:
      kl_anneal.epochs: [0, 5]
    """))
    specs = expand(exp)
    assert [s.settings.kl_anneal.epochs for s in specs] == [0, 5]
    assert all(s.settings.kl_anneal.schedule == "linear" for s in specs)
    assert specs[1].name.endswith("-epochs5-s0")


def test_params_are_flat_strings(write_yaml) -> None:
    spec = expand(load_experiment(write_yaml(BASE)))[0]
    params = spec.params()
    assert params["kl_anneal.schedule"] == "none" and params["arch_options.mlp.hidden"] == "[512]"
    assert all(isinstance(v, str) for v in params.values())


def test_settings_added_later_keep_the_run_keys_of_earlier_runs() -> None:
    # keys written before lr_schedule / val_fraction / family_options / prior existed (commit 2ab5265)
    assert run_key(RunSettings(dataset="digits", model="vae", latent_dim=4)) == "7067a9aa33e7"
    assert run_key(RunSettings(dataset="mnist", model="dae", arch="conv", noise=0.5,
                               kl_anneal={"schedule": "linear", "epochs": 3})) == "2891ad2053b5"
    # spelling a default out changes nothing; any other value is another cell
    base = RunSettings(dataset="digits", model="vae", latent_dim=4)
    assert run_key(base.model_copy(update={"val_fraction": 0.1})) == "7067a9aa33e7"
    assert run_key(RunSettings(dataset="digits", latent_dim=4, lr_schedule={"kind": "none"})) == "7067a9aa33e7"
    assert run_key(RunSettings(dataset="digits", latent_dim=4, val_fraction=0.2)) != "7067a9aa33e7"
    assert run_key(RunSettings(dataset="digits", latent_dim=4, lr_schedule={"kind": "cosine"})) != "7067a9aa33e7"


def test_expansion_gives_the_same_keys_as_run_key_for_later_settings(write_yaml) -> None:
    specs = expand(load_experiment(write_yaml("""
        name: m
        defaults: {dataset: digits, epochs: 1}
        matrix:
          val_fraction: [0.1, 0.2]
          lr_schedule.kind: [none, step, cosine]
        """)))
    assert len({s.key for s in specs}) == 6 and all(s.key == run_key(s.settings) for s in specs)
