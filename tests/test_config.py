"""Schema errors: one test per kind of bad input. Each names the file, the key path (and line),
the bad value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from vaebench.config import ConfigError, load_experiment

GOOD = """
name: good
defaults: {dataset: digits, epochs: 1}
matrix:
  model: [ae, vae]
"""


def errors_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    text = str(info.value)
    assert str(path) in text
    return text


def test_good_file_loads(write_yaml) -> None:
    exp = load_experiment(write_yaml(GOOD))
    assert exp.name == "good" and exp.matrix == {"model": ["ae", "vae"]}
    assert exp.resolved_tracking_uri() == "sqlite:///" + str(exp.base_dir / "mlruns.db")


def test_unknown_top_level_key(write_yaml) -> None:
    text = errors_of(write_yaml(GOOD + "epochz: 3\n"))
    assert "epochz" in text and "unknown key" in text and "allowed:" in text and "matrix" in text


def test_unknown_setting_in_defaults_names_line(write_yaml) -> None:
    text = errors_of(write_yaml("name: x\ndefaults:\n  dataset: digits\n  lr_rate: 0.1\nmatrix: {model: [vae]}\n"))
    assert ":4: defaults.lr_rate: unknown key 'lr_rate'" in text
    assert "latent_dim" in text  # lists what is allowed


def test_wrong_type(write_yaml) -> None:
    text = errors_of(write_yaml("name: x\ndefaults: {epochs: many}\nmatrix: {model: [vae]}\n"))
    assert "defaults.epochs" in text and "'many'" in text and "integer" in text


def test_out_of_range_matrix_value_points_at_the_value(write_yaml) -> None:
    text = errors_of(write_yaml("name: x\nmatrix:\n  beta:\n    - 1.0\n    - -2.0\n"))
    assert ":5: matrix.beta[1]: -2.0" in text and "greater than or equal to 0" in text



def test_errors_in_defaults_do_not_hide_the_matrix_and_include_errors(write_yaml) -> None:
    """One run lists every problem: the matrix and includes are checked on the defaults without
    their wrong keys, for their own values' errors only (nothing said twice)."""
    text = errors_of(write_yaml(
        "name: x\ndefaults:\n  epochs: -3\n  batch_size: 0\nmatrix:\n  beta: [1.0, -2.0]\n"
        "  arch: [mlp, transformer]\ninclude:\n  - {latent_dim: 0}\n"))
    assert ":3: defaults.epochs: -3" in text and ":4: defaults.batch_size: 0" in text
    assert ":6: matrix.beta[1]: -2.0" in text and ":7: matrix.arch[1]: 'transformer'" in text
    assert ":9: include[0].latent_dim: 0" in text
    assert text.count("epochs") == 1 and text.count("batch_size") == 1


@pytest.mark.parametrize("axis,value,allowed", [
    ("dataset", "mnistt", "digits"), ("model", "gan", "vae"), ("arch", "resnet", "deep_conv"),
    ("reduction", "median", "'sum' or 'mean'"), ("device", "tpu", "cuda:N"),
])
def test_unknown_names(write_yaml, axis: str, value: str, allowed: str) -> None:
    text = errors_of(write_yaml(f"name: x\nmatrix:\n  {axis}: [{value}]\n"))
    assert f"matrix.{axis}[0]" in text and value in text and allowed in text


def test_unknown_arch_option(write_yaml) -> None:
    text = errors_of(write_yaml("name: x\ndefaults:\n  arch_options:\n    mlp: {hiden: [3]}\nmatrix: {model: [vae]}\n"))
    assert "defaults.arch_options" in text and "hiden" in text


def test_options_for_unknown_arch(write_yaml) -> None:
    text = errors_of(write_yaml("name: x\ndefaults:\n  arch_options:\n    transformer: {}\nmatrix: {model: [vae]}\n"))
    assert "transformer" in text and "allowed: conv, deep_conv, mlp" in text


def test_empty_matrix(write_yaml) -> None:
    assert "the matrix is empty" in errors_of(write_yaml("name: x\nmatrix: {}\n"))


def test_empty_axis(write_yaml) -> None:
    assert "matrix.beta: empty list" in errors_of(write_yaml("name: x\nmatrix:\n  beta: []\n"))


def test_duplicate_axis_in_yaml(write_yaml) -> None:
    text = errors_of(write_yaml("name: x\nmatrix:\n  beta: [1]\n  model: [vae]\n  beta: [2]\n"))
    assert ":5: invalid YAML: duplicate key 'beta' (first at line 3)" in text


def test_seed_axis_duplicates_seeds(write_yaml) -> None:
    assert "duplicate axis" in errors_of(write_yaml("name: x\nseeds: [0, 1]\nmatrix:\n  seed: [1, 2]\n"))


def test_overlapping_dotted_axis(write_yaml) -> None:
    text = errors_of(write_yaml("name: x\nmatrix:\n  kl_anneal: [{schedule: none}]\n  kl_anneal.epochs: [1]\n"))
    assert "duplicate axis" in text and "kl_anneal.epochs" in text


def test_a_dotted_axis_with_an_unknown_key_names_the_keys_it_has(write_yaml) -> None:
    text = errors_of(write_yaml("name: x\nmatrix:\n  model: [vae]\n  kl_anneal.epoch: [1, 2]\n"))
    assert ":4: matrix.kl_anneal.epoch: 'kl_anneal.epoch' is not a setting path: kl_anneal has no key 'epoch'; " \
           "allowed: schedule, epochs, cycles, ratio" in text
    assert "Extra inputs" not in text and text.count("epoch'") == 2  # once for the axis, not per value


def test_unknown_axis(write_yaml) -> None:
    text = errors_of(write_yaml("name: x\nmatrix:\n  learning_rate: [0.1]\n"))
    assert "matrix.learning_rate: unknown setting 'learning_rate'" in text and "lr" in text


def test_everything_excluded(write_yaml) -> None:
    text = errors_of(write_yaml("name: x\nmatrix: {model: [vae]}\nexclude:\n  - {model: vae}\n"))
    assert "expands to no runs" in text


def test_exclude_unknown_setting(write_yaml) -> None:
    text = errors_of(write_yaml("name: x\nmatrix: {model: [vae]}\nexclude:\n  - {modle: vae}\n"))
    assert "exclude[0].modle: unknown setting" in text


@pytest.mark.parametrize("rule", ["{model: ae}", "{model: vae, latent_dim: 3}", "{arch: conv}"])
def test_exclude_rule_that_matches_no_cell(write_yaml, rule: str) -> None:
    # a typo in a value (or a value the matrix no longer has) would otherwise exclude nothing, silently
    path = write_yaml("name: x\nmatrix: {model: [vae, dae], latent_dim: [2, 4]}\ninclude:\n  - {model: ae}\n"
                      f"exclude:\n  - {{model: dae, latent_dim: 2}}\n  - {rule}\n")
    text = errors_of(path)
    assert f":7: exclude[1]: {rule} matches no cell of the matrix" in text
    assert "exclude[0]" not in text and len(text.splitlines()) == 1


def test_unknown_key_in_an_include_entry_is_reported_once(write_yaml) -> None:
    text = errors_of(write_yaml("name: x\nmatrix: {model: [vae]}\ninclude:\n  - {model: vae, latnt_dim: 8}\n"))
    assert ":4: include[0].latnt_dim: unknown setting 'latnt_dim'; allowed: dataset" in text
    assert len(text.splitlines()) == 1


def test_problems_are_listed_in_the_file_order(write_yaml) -> None:
    text = errors_of(write_yaml("name: x\nmatrix:\n  model: [gan]\nexclude:\n  - {modle: vae}\n"
                                "include:\n  - {beta: -1}\n"))
    lines = [line.split(":")[1] for line in text.splitlines()]
    assert lines == sorted(lines, key=int) and len(lines) == 3


@pytest.mark.parametrize("uri,message", [
    ("foo://bar", "unsupported scheme 'foo'; allowed: sqlite, postgresql"),
    ("sqlite://relative.db", "a SQLite URI has three slashes before a relative path"),
    ("mlruns", "not a tracking URI; e.g. sqlite:///mlruns.db")])
def test_a_tracking_uri_mlflow_cannot_open_is_refused_at_load(write_yaml, uri: str, message: str) -> None:
    # each used to pass `ls` and stop `run` with MLflow's own words, naming neither file nor key
    text = errors_of(write_yaml(GOOD + f"tracking_uri: {uri}\n"))
    assert f":5: tracking_uri: {uri!r}: {message}" in text


@pytest.mark.parametrize("defaults,message", [
    ("{model: info_vae, family_options: {info_vae: {alpha: 0, weight: 0.5}}}",
     ":3: defaults.family_options: info_vae: alpha + weight must be >= 1"),
    ("{compile: on}", ":3: defaults.compile: True: on/true/yes is not a compile setting; allowed: auto"),
    ("{gaussian_sigma: learnt}", ":3: defaults.gaussian_sigma: 'learnt': must be a number > 0 or 'learned'"),
    ("", ":3: defaults: empty (the key has no value); give a mapping, or leave the key out")])
def test_messages_say_what_the_user_wrote_once(write_yaml, defaults: str, message: str) -> None:
    # no pydantic internals ("value.", "Value error, ", "instance of ..."), one line per problem
    text = errors_of(write_yaml(f"name: x\nmatrix: {{model: [vae]}}\ndefaults: {defaults}\n"))
    assert message in text and len(text.splitlines()) == 1 and "Value error" not in text


def test_x_keys_hold_anchors_and_are_no_setting(write_yaml) -> None:
    exp = load_experiment(write_yaml("name: x\nx-small: &small {hidden: [16]}\n"
                                     "defaults: {dataset: digits, arch_options: {mlp: *small}}\nmatrix: {model: [vae]}\n"))
    assert exp.defaults["arch_options"] == {"mlp": {"hidden": [16]}}
    assert "unknown key 'y-small'" in errors_of(write_yaml("name: x\ny-small: 1\nmatrix: {model: [vae]}\n", "y.yaml"))


def test_bad_include_entry(write_yaml) -> None:
    text = errors_of(write_yaml("name: x\nmatrix: {model: [vae]}\ninclude:\n  - {model: dae, noise: -1}\n"))
    assert "include[0].noise" in text and "-1" in text


def test_invalid_yaml_syntax(write_yaml) -> None:
    assert "invalid YAML" in errors_of(write_yaml("name: x\nmatrix: [\n"))


def test_not_a_mapping(write_yaml) -> None:
    assert "must be a mapping" in errors_of(write_yaml("- a\n- b\n"))


def test_missing_file(tmp_path: Path) -> None:
    assert "cannot read the file" in errors_of(tmp_path / "nope.yaml")


def test_image_folder_needs_a_path(write_yaml) -> None:
    text = errors_of(write_yaml("name: x\nmatrix: {dataset: [image_folder]}\n"))
    assert "dataset_options.image_folder" in text and "path" in text


def test_several_problems_reported_together(write_yaml) -> None:
    text = errors_of(write_yaml("name: x\nmatrix:\n  beta: [-1]\n  model: [gan]\n"))
    assert "matrix.beta[0]" in text and "matrix.model[0]" in text


def test_environment_overrides(write_yaml, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    exp = load_experiment(write_yaml(GOOD + "tracking_uri: sqlite:///sub/store.db\ndata_dir: d\n"))
    assert exp.resolved_tracking_uri() == "sqlite:///" + str(tmp_path / "sub" / "store.db")
    assert exp.resolved_data_dir() == tmp_path / "d"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    monkeypatch.setenv("VAEBENCH_DATA_DIR", str(tmp_path / "elsewhere"))
    assert exp.resolved_tracking_uri() == "http://127.0.0.1:5999"
    assert exp.resolved_data_dir() == tmp_path / "elsewhere"


def test_a_typo_inside_an_options_block_is_shown_at_its_own_line(write_yaml) -> None:
    text = errors_of(write_yaml("""
        name: x
        defaults:
          dataset: digits
          arch_options:
            conv:
              kernel_size: 4
              chanels: [8]
        matrix:
          model: [vae]
        """))
    assert ":7: defaults.arch_options: conv.chanels: unknown option; allowed: channels" in text
    text = errors_of(write_yaml("""
        name: x
        defaults: {dataset: digits, model: iwae}
        include:
          - family_options:
              iwae:
                kk: 3
        """))
    assert ":6: include[0].family_options: iwae.kk: unknown option; allowed: k, objective" in text
