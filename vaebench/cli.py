"""`vaebench run / evaluate / tune / report / ls / ui`: `main(argv) -> int`, testable in process.

Exit codes: 0 ok, 1 some cell failed (or an unexpected error), 2 bad input (experiments file,
flags), 130 interrupted by Ctrl-C and 143 stopped by SIGTERM (rerun to resume), 141 the output's
reader went away (`| head`; as a Unix tool killed by SIGPIPE, and a sweep resumes from there).

SIGTERM (a scheduler's stop, `kill`, `timeout`) is taken as Ctrl-C is: `run` and `tune` stop at the
end of the current batch (with --jobs, each worker does), every other command stops as if
interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterator

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PIPE = 0, 1, 2, 141  # stopped by a signal: 128 + it
STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
_received: list[int] = []  # the stop signals this process got, in order (its exit code is 128 + the first)
LONG_COMMANDS = ("run", "evaluate", "tune")  # a sweep that stops early says so


def _err(msg: str) -> None:
    try:
        print(msg, file=sys.stderr, flush=True)
    except BrokenPipeError:  # stderr is the closed pipe too (`2>&1 | head`): the message goes nowhere
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stderr.fileno())


def _load(args: argparse.Namespace):
    from vaebench.config import load_experiment

    return load_experiment(args.file)


def _only(args: argparse.Namespace) -> dict[str, list[Any]]:
    import math

    import yaml

    from vaebench.runner import SelectionError, parse_only

    only: dict[str, list[Any]] = {}
    for item in args.only or []:
        shown = repr(item if len(item) <= 60 else item[:55] + "...")
        # one at a time, so that an error names its filter; the value is YAML, which can fail to
        # parse (`beta=[`, `x=!!python/name:os.system`) or hold what no setting takes
        try:
            parsed = parse_only([item])
        except SelectionError:
            raise
        except (yaml.YAMLError, ValueError, RecursionError) as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise SelectionError(f"--only {shown}: the value is not valid YAML ({problem[:200]}); "
                                 "quote text that YAML reads otherwise, e.g. --only 'dataset=\"x: y\"'") from None
        for key, values in parsed.items():
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise SelectionError(f"--only {shown}: not a finite number; allowed: finite numbers")
            only.setdefault(key, []).extend(values)
    return only


@contextlib.contextmanager
def graceful_interrupt(at: str = "the end of the current batch") -> Iterator[Callable[[], bool]]:
    """The first Ctrl-C asks the sweep to stop at the next batch boundary (checkpoints stay
    consistent, the run is marked KILLED and resumes later); a second one interrupts at once."""
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        _received.append(signum)
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        _err(f"\nstopping at {at} ({STOP_SIGNALS[signum]} again to stop at once)")

    try:
        previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    except ValueError:  # not the main thread: leave signals alone
        yield stop.is_set
        return
    try:
        yield stop.is_set
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


def _terminate_as_interrupt(signum: int, frame: Any) -> None:
    """SIGTERM outside a sweep: what Ctrl-C does (KeyboardInterrupt, with its clean-up)."""
    _received.append(signum)
    raise KeyboardInterrupt


def cmd_run(args: argparse.Namespace) -> int:
    from vaebench.runner import run_experiment

    exp = _load(args)
    from tqdm.auto import tqdm

    with graceful_interrupt() as should_stop:
        # tqdm.write keeps the per-cell lines above the progress bars instead of through them
        summary = run_experiment(exp, only=_only(args), force=args.force, jobs=args.jobs, pack=args.pack,
                                 eval_workers=args.eval_workers, progress=not args.no_progress,
                                 echo=tqdm.write, should_stop=should_stop, retry_failed=args.retry_failed,
                                 fail_fast=args.fail_fast, ray=_ray(args))
    for line in summary.lines():
        print(line)
    if not args.no_report:
        _write_report(exp, args.file)
    return summary.exit_code


def _ray(args: argparse.Namespace) -> Any:
    """RayOptions for `--executor ray`, None for the local executors."""
    if args.executor != "ray":
        for flag in ("ray_address", "ray_gpus", "ray_cpus"):
            if getattr(args, flag, None) is not None:
                raise UsageError(f"--{flag.replace('_', '-')} needs --executor ray")
        return None
    from vaebench.runner import RayOptions

    return RayOptions(address=args.ray_address, gpus=getattr(args, "ray_gpus", None),
                      cpus=1.0 if getattr(args, "ray_cpus", None) is None else args.ray_cpus)


class UsageError(ValueError):
    """Flags that do not fit together."""


def _write_report(exp: Any, file: str) -> None:
    """The report after a sweep or a study; its failure never fails the runs (they are safe in
    MLflow, and `vaebench report` rebuilds it)."""
    try:
        from vaebench.report import build_report

        print(f"report written to {build_report(exp)}")
    except Exception as e:  # noqa: BLE001
        _err(f"warning: could not write the report ({type(e).__name__}: {e}); "
             f"rebuild it with `vaebench report {file}`")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vaebench.runner import evaluate_experiment

    exp = _load(args)
    overrides = {"iw_samples": args.iw_samples} if args.iw_samples else {}
    summary = evaluate_experiment(exp, only=_only(args), overrides=overrides)
    for line in summary.lines():
        print(line)
    if not args.no_report:  # the new figures replace the old ones there, as after `run`
        _write_report(exp, args.file)
    return summary.exit_code


def cmd_tune(args: argparse.Namespace) -> int:
    from vaebench.config.schema import storage_problem
    from vaebench.outputs import output_path
    from vaebench.report.vocabulary import filename_safe
    from vaebench.tune import tune_experiment
    from vaebench.tune.storage import study_files

    exp = _load(args)
    if args.storage and (bad := storage_problem(args.storage)):  # as tune.storage is checked in the file
        raise UsageError(f"--storage: {bad}")
    if args.storage and exp.tune is not None:
        exp = exp.model_copy(update={"tune": exp.tune.model_copy(update={"storage": args.storage})})
    if args.executor != "ray" and args.ray_address is not None:
        raise UsageError("--ray-address needs --executor ray")
    # checked before the study: a path that cannot be written is better said now than after it
    export = (output_path(args.export, f"{filename_safe(exp.name)}-best.yaml", "--export", keep=study_files(exp))
              if args.export else None)
    # a stop is taken where it is safe to (a KeyboardInterrupt inside a SQLite write can leave the
    # database locked): at a batch, after a trial, or (--jobs) while waiting for the workers
    local = args.executor != "ray"
    with (graceful_interrupt("the end of the current batch, or of the trial being evaluated") if local
          else contextlib.nullcontext(None)) as should_stop:
        code = tune_experiment(exp, n_trials=args.trials, n_jobs=args.jobs, timeout=args.timeout,
                               export=export, echo=print, on_ray=args.executor == "ray",
                               ray_address=args.ray_address, should_stop=should_stop)
    if not args.no_report:
        _write_report(exp, args.file)
    return code


def cmd_report(args: argparse.Namespace) -> int:
    from vaebench.report import build_report

    path = build_report(_load(args), out=args.out, fmt=args.format)
    print(f"report written to {path}")
    return EXIT_OK


def cmd_ls(args: argparse.Namespace) -> int:
    from vaebench.matrix import expand
    from vaebench.runner import plural, select

    exp = _load(args)
    specs = select(expand(exp), _only(args))
    axes = list(dict.fromkeys(a for s in specs for a in s.axes))
    rows = [["#", "name", "run key", *axes]]
    rows += [[str(i + 1), s.name, s.key, *(_cell(s.axes.get(a, getattr(s.settings, a, ""))) for a in axes)]
             for i, s in enumerate(specs)]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    print(f"{plural(len(specs), 'cell')} in {exp.name!r}; tracking: {exp.resolved_tracking_uri()}")
    return EXIT_OK


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v) if not isinstance(v, (dict, list)) else str(v).replace(" ", "")


def cmd_ui(args: argparse.Namespace) -> int:
    from vaebench.config import ENV_TRACKING_URI

    if args.file:
        uri = _load(args).resolved_tracking_uri()
    else:
        uri = os.environ.get(ENV_TRACKING_URI) or "sqlite:///" + os.path.abspath("mlruns.db")
    if uri.startswith(("http://", "https://")):
        print(f"the tracking store is a server: open {uri}")
        return EXIT_OK
    # One worker and no background job runners: a single user on a laptop, not a team server
    # (MLflow's defaults start 4 workers and 8 job processes, ~2 GB). The server replaces this
    # process, so stopping it (Ctrl-C, a signal) stops the whole server, children included.
    problem = _cannot_listen(args.host, args.port)
    if problem:  # said here: the server would log it among its start-up lines and exit 0
        raise UsageError(problem)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port), "--workers", "1"]
    print(f"MLflow UI on http://{args.host}:{args.port} (store {uri}); Ctrl-C to stop", flush=True)
    os.execve(sys.executable, cmd, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    return EXIT_OK  # not reached


def _cannot_listen(host: str, port: int) -> str | None:
    """Why a server could not listen on host:port, or None: binding a socket the way it will."""
    import errno
    import socket

    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        return f"--host {host!r}: not a name or address this machine can resolve ({e.strerror})"
    with socket.socket(family, kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server: a port in TIME_WAIT is free
        try:
            sock.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return (f"port {port} on {host} is already in use (another MLflow UI?); open that one, or pick "
                        f"another port: --port {port + 1 if port < 65535 else 5000}")
            return f"cannot listen on {host}:{port}: {e.strerror or e}"
    return None


def _port(text: str) -> int:
    value = _whole(text, 1)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 1 to 65535, got {value}")
    return value


def _pack(text: str) -> str | int:
    from vaebench.plan import parse_pack

    try:
        return parse_pack(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--pack {text!r}: ")) from None


def _whole(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _whole(text, 1)


def _iw_samples(text: str) -> str | int:
    """auto (per device, as evaluate.iw_samples: auto), or k >= 1."""
    return text if text == "auto" else _whole(text, 1)


def _workers(text: str) -> str | int:
    """auto, or a number of processes >= 0 (0: in place)."""
    return text if text == "auto" else _whole(text, 0)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "evaluate": cmd_evaluate, "tune": cmd_tune, "report": cmd_report, "ls": cmd_ls,
    "ui": cmd_ui}


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _seconds(text: str) -> float:
    """A time limit: a finite number of seconds > 0."""
    value = _number(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _cluster_flags(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--executor", choices=["local", "ray"], default="local",
                    help="local: this machine (default); ray: tasks on a Ray cluster (see README, Running on a cluster)")
    sp.add_argument("--ray-address", metavar="ADDR",
                    help="the Ray cluster: auto (started with `ray start` here), HOST:PORT or ray://...; default "
                         "RAY_ADDRESS, else a new local cluster")


def build_parser() -> argparse.ArgumentParser:
    from vaebench import __version__

    p = argparse.ArgumentParser(prog="vaebench", description="Benchmark autoencoders and VAEs from one YAML matrix.")
    p.add_argument("--version", action="version", version=f"vaebench {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_file(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("file", help="the experiments file, e.g. experiments.yaml")
        sp.add_argument("--only", action="append", metavar="SETTING=VALUE",
                        help="restrict to cells whose SETTING equals VALUE (repeatable; same setting twice = either)")
        return sp

    run = with_file("run", "train and evaluate every cell not already finished, logging to MLflow")
    run.add_argument("--force", action="store_true", help="retrain cells that already have a finished run")
    run.add_argument("--retry-failed", action="store_true",
                     help="train afresh, in a new run, the cells whose last attempt failed for a reason that "
                          "repeats (diverged, bad settings, an error); by default they are reported, not retried. "
                          "Interrupted attempts and failures of the store, disk or memory always resume")
    run.add_argument("--fail-fast", action="store_true",
                     help="stop the sweep at the first cell that fails (running cells end KILLED and resume "
                          "on the next run; exit code 1)")
    run.add_argument("--jobs", type=_positive_int, default=1, metavar="N",
                     help="N worker processes, each training its own units (CPU machines: threads split "
                          "between them; several GPUs: one per GPU). Default 1: this process")
    run.add_argument("--pack", type=_pack, default="auto", metavar="auto|off|N",
                     help="train up to N cells that share a step as one stacked model; auto: up to 32 on CUDA, "
                          "off on the CPU (default auto)")
    run.add_argument("--eval-workers", type=_workers, default="auto", metavar="auto|N",
                     help="processes for the CPU part of the evaluation (clustering, figures, uploads) while "
                          "training goes on; auto: up to 8 on CUDA, 0 (in place) on the CPU")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--no-report", action="store_true", help="do not write the HTML report afterwards")
    _cluster_flags(run)
    run.add_argument("--ray-gpus", type=_fraction, metavar="F",
                     help="GPUs per unit on the Ray cluster (a fraction shares a GPU; default 1 when it has GPUs)")
    run.add_argument("--ray-cpus", type=_fraction, default=None, metavar="N", help="CPUs per unit (default 1)")
    ev = with_file("evaluate", "redo the evaluation of finished runs from their saved models (no retraining)")
    ev.add_argument("--iw-samples", type=_iw_samples, metavar="K",
                    help="k of the importance-weighted NLL, or auto (overrides evaluate.iw_samples)")
    ev.add_argument("--no-report", action="store_true", help="do not rebuild the HTML report afterwards")
    tune = sub.add_parser("tune", help="run the Optuna study defined under `tune:`", description=(
        "Run (or resume) the Optuna study defined under `tune:`; every trial is an MLflow run."))
    tune.add_argument("file", help="the experiments file")
    tune.add_argument("--trials", type=_positive_int, help="the study's total of finished trials, counted across reruns (overrides tune.n_trials)")
    tune.add_argument("--jobs", type=_positive_int, default=1, help="worker processes sharing the study")
    tune.add_argument("--timeout", type=_seconds, help="stop starting new trials after this many seconds")
    tune.add_argument("--export", metavar="PATH", help="write the best settings as an experiments file")
    tune.add_argument("--no-report", action="store_true", help="do not write the HTML report afterwards")
    tune.add_argument("--storage", metavar="URL",
                      help="the Optuna storage (overrides tune.storage), e.g. postgresql://user@host/optuna")
    _cluster_flags(tune)
    report = sub.add_parser("report", help="(re)build the HTML report from what is in MLflow")
    report.add_argument("file", help="the experiments file")
    report.add_argument("--out", metavar="PATH", help="output file, or a directory to write it in "
                                                      "(default reports/<name>.html next to the file)")
    report.add_argument("--format", choices=["html", "csv"], default="html")
    with_file("ls", "print the expanded matrix as a table (nothing is trained)")
    ui = sub.add_parser("ui", help="open the MLflow UI on the project's tracking store (localhost only)")
    ui.add_argument("file", nargs="?", help="the experiments file (its tracking store); default ./mlruns.db")
    ui.add_argument("--port", type=_port, default=5000, help="TCP port (default 5000)")
    ui.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    _received.clear()
    try:
        previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        return _dispatch(args)
    finally:
        if previous is not None:  # main() called in process (tests) leaves the handler as it was
            signal.signal(signal.SIGTERM, previous)


def _dispatch(args: argparse.Namespace) -> int:
    """The command, its errors turned into one message and an exit code."""
    from vaebench.cluster import ClusterError
    from vaebench.config.schema import ConfigError, UnreadableFile
    from vaebench.outputs import OutputPathError
    from vaebench.runner import SelectionError
    from vaebench.tune.storage import StorageUnavailable

    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a reader gone before the last lines: here, not at interpreter exit
        return code
    except BrokenPipeError:  # stdout's reader closed it (`vaebench ls ... | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # what is still buffered goes nowhere, without a second error
        if args.command in LONG_COMMANDS:
            _err("stopped: the output was closed; finished cells are kept, run the same command again "
                 "to continue")
        return EXIT_PIPE
    except ConfigError as e:
        what = "cannot read the experiments file" if isinstance(e, UnreadableFile) else "invalid experiments file"
        _err(f"error: {what}\n{e}")
        return EXIT_USAGE
    except (SelectionError, UsageError, OutputPathError) as e:
        _err(f"error: {e}")
        return EXIT_USAGE
    except (ClusterError, StorageUnavailable) as e:
        _err(f"error: {e}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        by = _received[0] if _received else signal.SIGINT
        kept = "finished trials are kept" if args.command == "tune" else "finished cells are kept"
        _err(f"{'interrupted' if by == signal.SIGINT else 'stopped by SIGTERM'}: {kept}; "
             f"run the same command again to resume")
        return 128 + by  # 130 (Ctrl-C) or 143 (SIGTERM), as a shell reports a process the signal ended
    except Exception as e:  # noqa: BLE001 - a message, not a traceback (VAEBENCH_DEBUG=1 shows it)
        if os.environ.get("VAEBENCH_DEBUG"):
            raise
        _err(f"error: {_one_line(e)}")
        return EXIT_FAILED


def _one_line(e: BaseException) -> str:
    """An unexpected error in one line; a store that is read-only or full says so in words."""
    from vaebench.tracking import first_line

    text = str(e)
    for needle, words in STORE_ERRORS.items():
        if needle in text:
            return f"{words} ({type(e).__name__}: {first_line(e, 200)})"
    return f"{type(e).__name__}: {first_line(e)}"


STORE_ERRORS = {  # SQLite's words -> ours
    "attempt to write a readonly database": "the tracking store is read-only; make it writable or point "
                                            "tracking_uri / MLFLOW_TRACKING_URI at one that is",
    "database or disk is full": "the disk of the tracking store is full; free some space and run again "
                                "(finished cells are kept, the others resume)",
    "unable to open database file": "the tracking store cannot be opened (a missing folder, or no permission)",
}


def entrypoint() -> None:
    # the application, not the library, quiets MLflow's per-download progress bars (the report
    # reads every run's figures through them)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    sys.exit(main())
