"""The benchmark scripts that run on the CPU still run: each at its smallest, on embedded data.
(Their figures are taken by hand and recorded in benchmarks/README.md; here only that they work
and that what they print holds together.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_twins_prints_each_cell_with_its_twins_and_their_gap(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_twins.py"), "--dataset", "digits",
                          "--data-dir", str(tmp_path), "--epochs", "2", "--twins", "2", "--test-samples", "100",
                          "--iw-samples", "10", "--latent", "4", "--beta", "2"],
                         check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("vae-mlp-z4-b2-sum")]
    reference = float(re.search(r"reference test/elbo (-?[\d.]+)", line).group(1))
    twins = [float(v) for v in re.search(r"perturbed twins ([-\d., ]+);", line).group(1).split(", ")]
    gap = float(re.search(r"\|gap\| max ([\d.]+)", line).group(1))
    assert len(twins) == 2 and reference < 0
    assert gap == pytest.approx(max(abs(t - reference) for t in twins), abs=0.01)
    assert gap < 0.5, "one-ulp perturbations stay small over two epochs"
    best = re.search(r"best epochs: reference (\d+), twins ([\d, ]+)$", line)
    epochs = [int(best.group(1))] + [int(e) for e in best.group(2).split(", ")]
    assert len(epochs) == 3 and all(e in (0, 1) for e in epochs)  # two epochs: 0 or 1
    packed = re.search(r"packed beside a sibling \(K=2, cpu, eager\): test/elbo (-?[\d.]+), \|gap\| ([\d.]+) nats "
                       r"\(best epoch (\d)\)", out.stdout)
    assert packed and abs(float(packed.group(1)) - reference) < 0.5 and int(packed.group(3)) in (0, 1)


def test_bench_twins_branches_at_initialisation_and_packs_k_members(tmp_path: Path) -> None:
    """`--from init`: the twins branch from a checkpoint of no epoch, built as train() starts a
    run, so the unchanged twin is the run trained straight through, bit for bit."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_twins.py"), "--dataset", "digits",
                          "--data-dir", str(tmp_path), "--epochs", "2", "--twins", "1", "--test-samples", "100",
                          "--iw-samples", "10", "--latent", "4", "--beta", "2", "--from", "init", "--pack-size", "3"],
                         check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "vae-mlp-z4-b2-sum (2 epochs, branched at initialisation," in out.stdout
    assert "  the reference is bit for bit the run trained straight through" in out.stdout
    assert re.search(r"packed beside 2 siblings \(K=3, cpu, eager\): test/elbo -[\d.]+", out.stdout)


def test_bench_twins_refuses_unpaired_latent_and_beta() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_twins.py"), "--latent", "2", "16",
                          "--beta", "1"], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--latent and --beta pair up" in out.stderr


def test_bench_step_counts_fewer_kernels_for_the_flat_update(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--dataset", "digits",
                          "--data-dir", str(tmp_path), "--arch", "tiny", "--members", "1", "3", "--steps", "2"],
                         check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = [ln.split() for ln in out.stdout.splitlines() if ln.startswith("tiny ")]
    assert [int(r[1]) for r in rows] == [1, 3]
    for _, _, base, flat, ratio, base_update, flat_update, base_ms, flat_ms, speedup, tuned, tuned_up in rows:
        assert (tuned, tuned_up) == ("-", "-")  # cuDNN's autotuner is timed for conv on CUDA only
        assert int(flat_update) < int(base_update) and int(flat) < int(base)
        # the update is where they differ (the flat one may copy a non-contiguous gradient into place)
        assert 0 < int(base) - int(flat) <= int(base_update) - int(flat_update)
        assert float(ratio[:-1]) == pytest.approx(int(base) / int(flat), abs=0.01)
        assert float(base_ms) > 0 and float(flat_ms) > 0



def test_bench_overhead_times_the_loop_alone_and_in_the_runner_both_ways(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_overhead.py"), "--dataset", "digits",
                          "--data-dir", str(tmp_path), "--members", "2", "--epochs", "4", "--repeat", "1"],
                         check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = re.findall(r"^  (alone|runner, metrics every epoch|runner, metrics batched) +an epoch: ([0-9.]+) s in the "
                      r"loop \(x([0-9.]+)\), ([0-9.]+) s by the clock \(x([0-9.]+)\)$", out.stdout, re.M)
    assert [r[0] for r in rows] == ["alone", "runner, metrics every epoch", "runner, metrics batched"]
    assert rows[0][2] == rows[0][4] == "1.00" and all(float(r[1]) > 0 and float(r[3]) > 0 for r in rows)


@pytest.mark.slow
def test_bench_evaluate_times_the_likelihood_both_ways_and_the_protocol(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_evaluate.py"), "--dataset", "mnist5k",
                          "--data-dir", str(tmp_path), "--ks", "10"],
                         check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lik = re.search(r"fused BCE (\d+) ms, vaebench (\d+) ms -> x([\d.]+); largest per-image difference ([\d.e+-]+)",
                    out.stdout)
    assert lik and float(lik.group(3)) == pytest.approx(int(lik.group(1)) / int(lik.group(2)), abs=0.05)
    assert float(lik.group(4)) < 1e-2  # nats on per-image sums of ~1,200: rounding, not a different value
    assert re.search(r"k=10 +[\d.]+ s", out.stdout)
    assert len(re.findall(r"whole protocol on 1000 test images \(k=\d+, clustering on\): [\d.]+ s", out.stdout)) == 2


def test_bench_layout_times_both_layouts_and_finds_the_same_numbers(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_layout.py"), "--dataset", "digits",
                          "--data-dir", str(tmp_path), "--test-samples", "60", "--iw-samples", "4", "--repeats", "1"],
                         check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = re.findall(r"^  (channels-\w+) +([\d.]+) s  x([\d.]+) +max \|metric difference\| ([\d.e+-]+)",
                      out.stdout, re.M)
    assert [r[0] for r in rows] == ["channels-first", "channels-last"] * 2  # conv, deep_conv; no cudnn on the CPU
    for layout, seconds, ratio, gap in rows:
        assert float(seconds) > 0 and float(gap) < 1e-3
        if layout == "channels-first":
            assert float(ratio) == 1.0 and float(gap) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["plain", "captured"])
def test_bench_gpu_matrix_runs_part_of_the_study_on_both_sides(tmp_path: Path, engine: str) -> None:
    """The matrix part as a dry run on the CPU (where `--pack auto` packs nothing): it is meant for
    a GPU machine, where a broken script costs device time."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--part", "matrix",
                          "--matrix-dataset", "digits", "--matrix-epochs", "2", "--iw-samples", "4",
                          "--data-dir", str(tmp_path), "--only", "arch=mlp", "--only", "latent_dim=2",
                          "--only", "beta=1", "--only", "beta=4", "--cudnn-benchmark", "--switch-interval", "0.001",
                          "--baseline-engine", engine],
                         check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "(4 cells: --only arch=mlp latent_dim=2 beta=1 beta=4)" in out.stdout
    # which one-at-a-time side it was is in the line that gives its time
    assert ("s (the captured engine, one member a pack), exit code 0" in out.stdout) == (engine == "captured")
    # the what-ifs (no-ops on the CPU) are named with the device, so no figure is read without them
    assert out.stdout.startswith("device: CPU (cudnn.benchmark, switch interval 0.001 s); torch")
    assert out.stdout.splitlines()[0].endswith("; float32 math: fp32")
    cells = re.findall(r"^  (vae-mlp-z2-b\d-\w+-digits-s0): (-[\d.]+) vs (-[\d.]+) \(best epoch (\d) vs (\d)\)$",
                       out.stdout, re.M)
    assert len(cells) == 4
    gaps = [abs(float(a) - float(b)) for _, a, b, _, _ in cells]
    summary = re.search(r"max ([\d.]+) nats, mean ([\d.]+) over 4 cells; over the (\d) whose best epoch is the same",
                        out.stdout)
    assert summary and float(summary.group(1)) == pytest.approx(max(gaps), abs=0.01)
    assert int(summary.group(3)) == sum(1 for *_, e1, e2 in cells if e1 == e2)
    # the packed side's timeline (one cell a unit on the CPU): where each unit's time went
    epochs = re.findall(r"^    an epoch: ([\d.]+) s by the clock, ([\d.]+) s in the training loop", out.stdout, re.M)
    assert len(epochs) == 4 and all(float(loop) > 0 for _, loop in epochs)
    parts = re.findall(r"^    CPU parts started \+([\d.]+)\.\.\+[\d.]+, ended \+([\d.]+)\.\.", out.stdout, re.M)
    assert len(parts) == 4 and all(float(start) <= float(end) for start, end in parts)


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
@pytest.mark.parametrize("script", ["bench_gpu", "bench_step", "bench_evaluate", "bench_layout",
                                    "bench_overhead"])
def test_a_benchmark_asked_for_cuda_without_one_says_so_in_one_line(script: str, tmp_path: Path) -> None:
    # an empty data directory: the flag is refused before any file is looked for
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--device", "cuda",
                          "--data-dir", str(tmp_path)], check=False, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert re.search(r"error: .*(no CUDA device here|CUDA is not available here)", out.stderr.strip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script measures for minutes: it is run by hand there")
def test_gpu_checks_runs_every_step_and_keeps_each_log(tmp_path: Path) -> None:
    """Without CUDA each benchmark step refuses at once, and the script goes on to the next: what
    keeps one failing step from costing a device call the others."""
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_checks.sh")], check=False, capture_output=True,
                         text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
                              "VAEBENCH_DATA_DIR": str(tmp_path / "empty")})
    assert out.returncode == 0, out.stderr
    steps = re.findall(r"^== (\w+): .*\n   exit (\d+) after \d+ s", out.stdout, re.M)
    assert [name for name, _ in steps] == ["tests", "layout", "step", "loops", "overhead"]
    codes = dict(steps)
    assert codes["tests"] == "0"  # the CUDA tests skip, the channels-last ones pass on the CPU
    assert codes["layout"] == codes["step"] == codes["overhead"] == "2"  # --device cuda: one argparse error each
    assert codes["loops"] == "1"  # no MNIST in the empty data directory: one message
    for name, _ in steps:
        assert (tmp_path / "out" / f"{name}.log").stat().st_size > 0
    assert "Traceback" not in (tmp_path / "out" / "loops.log").read_text()
