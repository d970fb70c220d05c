"""Matrices at scale: a matrix that asks for more than MAX_CELLS cells is refused with its size
before anything is expanded; up to that, expansion (which validates each group of axis values once
instead of every cell) gives exactly what validating every cell gives. Timings are measured in
benchmarks/bench_matrix.py, not here."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from vaebench.cli import main
from vaebench.config import ConfigError, RunSettings, load_experiment
from vaebench.matrix import MAX_CELLS, RunSpec, apply_setting, expand, run_key, run_name, same_value, setting_value

# The deadline only catches a matrix that is expanded when it should have been counted;
# VAEBENCH_HOSTILE_EXAMPLES=2000 searches longer.
SCALE = settings(deadline=timedelta(seconds=10), suppress_health_check=[HealthCheck.too_slow],
                 max_examples=int(os.environ.get("VAEBENCH_HOSTILE_EXAMPLES", "100")))


@pytest.fixture(scope="module", autouse=True)
def _warm() -> None:
    import vaebench.data  # noqa: F401  (the first validation imports torch: keep it out of the deadlines)


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_matrix_beyond_the_limit_is_refused_with_its_size(write_yaml) -> None:
    # 10 x 10 x 10 x 10 x 10 x 10 values x 2 seeds = 2,000,000 cells: counted, never expanded
    axes = ["latent_dim", "epochs", "batch_size", "kl_anneal.epochs", "max_train_samples", "patience"]
    matrix = "".join(f"  {a}: [{', '.join(str(i + 1) for i in range(10))}]\n" for a in axes)
    path = write_yaml(f"name: big\nseeds: [0, 1]\ndefaults: {{dataset: digits}}\nmatrix:\n{matrix}"
                      "include:\n  - {model: dae}\n")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert time.perf_counter() - t0 < 5
    message = str(info.value)
    assert cli("ls", str(path))[0] == 2
    assert (f"{path}:4: matrix: the matrix would make 2,000,002 cells (10 x 10 x 10 x 10 x 10 x 10 values x 2 "
            f"seeds, plus 1 include entries); the limit is {MAX_CELLS:,} cells") in message


def test_matrix_at_the_limit_expands_and_lists(write_yaml) -> None:
    # 10^5 cells exactly (benchmarks/bench_matrix.py times it: a few seconds)
    axes = ["latent_dim", "epochs", "batch_size", "kl_anneal.epochs", "max_train_samples"]
    matrix = "".join(f"  {a}: [{', '.join(str(i + 1) for i in range(10))}]\n" for a in axes)
    path = write_yaml(f"name: big\ndefaults: {{dataset: digits}}\nmatrix:\n{matrix}")
    specs = expand(load_experiment(path))
    assert len(specs) == MAX_CELLS == len({s.key for s in specs})
    assert specs[-1].name == "vae-mlp-z10-b1-sum-digits-epochs10-batch_size10-kl_anneal.epochs10-max_train_samples10-s0"
    code, out, _ = cli("ls", str(path), "--only", "latent_dim=3", "--only", "epochs=4")
    assert code == 0 and f"{MAX_CELLS // 100} cells in 'big'" in out


@pytest.mark.timeout(300)
@SCALE
@given(sizes=st.lists(st.integers(1, 60), min_size=1, max_size=8), seeds=st.integers(1, 3),
       includes=st.integers(0, 3))
def test_a_matrix_too_large_is_refused_before_expanding(sizes: list[int], seeds: int, includes: int) -> None:
    n = math.prod(sizes) * seeds + includes * seeds
    assume(n <= 3000 or n > MAX_CELLS)
    axes = ["latent_dim", "epochs", "batch_size", "kl_anneal.epochs", "max_train_samples", "patience", "beta", "lr"]
    values = {"beta": lambda i: i * 0.5, "lr": lambda i: (i + 1) * 1e-4}
    doc = {"name": "big", "seeds": list(range(seeds)), "defaults": {"dataset": "digits"},
           "matrix": {a: [values.get(a, lambda i: i + 1)(i) for i in range(k)] for a, k in zip(axes, sizes)},
           "include": [{"model": "dae", "noise": 0.1 * (i + 1)} for i in range(includes)]}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "experiments.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        t0 = time.perf_counter()
        code, out, err = cli("ls", str(path))
        if n > MAX_CELLS:
            assert code == 2 and f"would make {n:,} cells" in err and f"the limit is {MAX_CELLS:,} cells" in err
            assert time.perf_counter() - t0 < 5  # counted, not expanded
        else:
            assert code == 0 and f"{n} cell{'s' if n != 1 else ''} in 'big'" in out and len(expand(load_experiment(path))) == n


@pytest.mark.timeout(300)
@SCALE
@given(defaults=st.fixed_dictionaries({"dataset": st.sampled_from(["digits", "mnist5k"])}, optional={
    "kl_anneal": st.sampled_from([{"schedule": "linear"}, {"schedule": "cyclical", "epochs": 4}]),
    "arch_options": st.sampled_from([{"mlp": {"hidden": [16]}}, {"conv": {"channels": [4]}}]),
    "beta": st.sampled_from([0.5, 2])}),
    axes=st.dictionaries(st.sampled_from(["model", "arch", "latent_dim", "beta", "reduction", "kl_anneal.epochs",
                                          "kl_anneal.schedule", "arch_options.mlp.hidden", "dataset", "device", "lr"]),
                         st.integers(1, 3), min_size=1, max_size=4),
    seeds=st.lists(st.integers(0, 5), min_size=1, max_size=2, unique=True),
    exclude=st.lists(st.dictionaries(st.sampled_from(["model", "beta", "latent_dim", "kl_anneal.epochs", "arch"]),
                                     st.sampled_from(["ae", "vae", 1, 2.0, 4, "mlp", "conv"]), min_size=1, max_size=2),
                     max_size=2))
def test_expansion_equals_validating_every_cell(defaults: dict, axes: dict, seeds: list, exclude: list) -> None:
    """expand() validates each group of axis values once; it must give exactly what validating
    every cell on its own gives: settings, run keys, names, order, exclusions."""
    choices = {"model": ["vae", "ae", "dae"], "arch": ["mlp", "conv", "deep_conv"], "latent_dim": [2, 16, 3],
               "beta": [1.0, 4, 0.25], "reduction": ["sum", "mean", "sum"], "kl_anneal.epochs": [0, 3, 5],
               "kl_anneal.schedule": ["none", "linear", "cyclical"], "arch_options.mlp.hidden": [[8], [16, 8], [4]],
               "dataset": ["digits", "mnist5k", "digits"], "device": ["cpu", "auto", "cuda"], "lr": [1e-3, 2e-3, 5e-4]}
    matrix = {a: list(dict.fromkeys(map(json.dumps, choices[a][:n]))) for a, n in axes.items()}
    matrix = {a: [json.loads(v) for v in vs] for a, vs in matrix.items()}
    doc = {"name": "eq", "seeds": seeds, "defaults": defaults, "matrix": matrix, "exclude": exclude}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "experiments.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        refused = None
        try:
            exp = load_experiment(path)
        except ConfigError as e:
            assume("expands to no runs" not in str(e))
            if "matches no cell of the matrix" not in str(e):
                raise
            refused = str(e)
        reference: dict[str, tuple] = {}
        used: set[int] = set()
        for combo in itertools.product(*matrix.values()):
            for seed in seeds:
                cell = {**dict(zip(matrix, combo)), "seed": seed}
                raw = defaults
                for axis, value in cell.items():
                    raw = apply_setting(raw, axis, value)
                s = RunSettings.model_validate(raw)
                spec = RunSpec(settings=s, axes=cell)
                hits = {i for i, rule in enumerate(exclude)
                        if all(same_value(setting_value(spec, k), v) for k, v in rule.items())}
                used |= hits
                if not hits:
                    reference.setdefault(run_key(s), (s.model_dump(), cell, run_name(s, cell)))
        unused = [i for i in range(len(exclude)) if i not in used]
        if refused is not None:  # a rule that removes nothing is refused, and named
            assert unused and f"exclude[{unused[0]}]" in refused
            return
        assert not unused
        got = [(spec.key, (spec.settings.model_dump(), spec.axes, spec.name)) for spec in expand(exp)]
        assert got == list(reference.items())
        assert all(spec.key == run_key(spec.settings) for spec in expand(exp))
