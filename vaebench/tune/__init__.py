"""`vaebench tune`: Optuna studies over the same train/evaluate functions as `vaebench run`.

A trial is one run: `defaults` + the study's fixed matrix cell (`tune.cell`) + a point of
`tune.space` -> `packed.train_one` -> `results.log_trained`, in its own MLflow run (a child of the
study's parent run). Per-epoch validation metrics go to MLflow and, for single-objective studies,
to the pruner; a pruned trial's MLflow run ends KILLED with its curve so far.

The study lives in an Optuna storage (default: `optuna.db` next to the MLflow store), so rerunning
the same command resumes it: `n_trials` is the study's total of finished (complete + pruned)
trials, and only the missing ones run. `--jobs N` starts N spawned worker processes that share the
study through that storage.

The modules, each importing only those above it:
- `space`: the search space (one `Dimension` per key of `tune.space`);
- `storage`: the sampler and pruner (from the registries in `vaebench.config`), the Optuna storage;
- `plan`: one study as seen by every process (`Plan`, `open_study`, a trial's settings);
- `trial`: one trial (`Objective`: one MLflow run, reports to the pruner);
- `workers`: running trials here or in worker processes, failing orphaned trials;
- `export`: the best trial as an experiments file;
- `study`: `tune_experiment`, the study's parent run, recording and summary.

The `tune:` section itself is validated by `vaebench.config.load_experiment` (with the helpers
`tune_fixed_cell`, `tune_base_settings` and `param_kind` that the tuner shares): the config layer
never imports this package.

Nothing heavy at import time: optuna, torch and mlflow are imported inside the functions.
"""

from vaebench.config import PRUNERS, RESERVED_OPTIONS, SAMPLERS
from vaebench.tune.export import export_best, file_tracking_uri
from vaebench.tune.plan import DEFAULT_TRIALS, Plan, decoded_params, make_plan, open_study, trial_settings
from vaebench.tune.space import Dimension, dimensions
from vaebench.tune.storage import (HEARTBEAT_SECONDS, make_pruner, make_sampler, open_storage, resolved_storage,
                                   sampler_seed, storage_display)
from vaebench.tune.study import TAG_BEST, best_trials, summary_lines, tune_experiment
from vaebench.tune.trial import (ATTR_ERROR, ATTR_PRUNED_AT, ATTR_RUN_ID, ATTR_RUN_KEY, ATTR_WORKER, TAG_STUDY,
                                 TAG_TRIAL_STATE, MetricUnavailable, Objective)
from vaebench.tune.workers import Printer, StaleRunCloser, fail_orphans, optimize

__all__ = [
    "ATTR_ERROR", "ATTR_PRUNED_AT", "ATTR_RUN_ID", "ATTR_RUN_KEY", "ATTR_WORKER", "DEFAULT_TRIALS",
    "HEARTBEAT_SECONDS", "PRUNERS", "RESERVED_OPTIONS", "SAMPLERS", "TAG_BEST", "TAG_STUDY", "TAG_TRIAL_STATE",
    "Dimension", "MetricUnavailable", "Objective", "Plan", "Printer", "StaleRunCloser", "best_trials",
    "decoded_params", "dimensions", "export_best", "fail_orphans", "file_tracking_uri",
    "make_plan", "make_pruner", "make_sampler", "open_storage", "open_study", "optimize", "resolved_storage",
    "sampler_seed", "storage_display", "summary_lines", "trial_settings", "tune_experiment",
]
