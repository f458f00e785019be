"""What kdbench writes to MLflow: the names of its tags, params, metrics and artifacts, and how a
param value is written and read back.

The writers (``kdbench.run``, ``kdbench.tune``, ``kdbench.sweep``) and the readers (``kdbench.table``,
``kdbench.plots``, the sweep's skip check) all import these names, so a table never depends on a
string typed twice. Params are the flattened recipe (``train.lr``, ``method.params.alpha``); a value
that is a list, dict, bool or None is written as JSON, anything else as ``str``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd  # imported where used: the training side (engine, bench) needs only the names


class Tag:
    """Run tags (strings)."""

    ROLE = "kdbench.role"  #: one of ``Role``
    METHOD = "method"  #: the method's registry name ("none" for the plain student)
    PRESET = "preset"  #: the method's preset ("-" for a teacher)
    DATASET = "dataset"
    TEACHER = "teacher"  #: "arch/backbone"
    STUDENT = "student"  #: "arch/backbone" of the trained model (the teacher's own, in a teacher run)
    SEED = "seed"
    RECIPE_HASH = "recipe.hash"  #: the resolved recipe's hash: one cell of a sweep
    EVAL_SPLIT = "eval_split"  #: "val", or "holdout" for tuning trials
    TEACHER_MIOU = "teacher.miou"
    TEACHER_RUN = "teacher.run_id"  #: the MLflow run that trained a student's teacher (its weights are logged there, once)
    VERSION = "kdbench.version"
    COMMIT = "git.commit"
    ERROR = "error"  #: the one-line error of a FAILED or KILLED run
    PARENT = "mlflow.parentRunId"
    STUDY = "study"
    TRIAL = "kdbench.trial"
    TRIAL_STATE = "kdbench.trial_state"
    SWEEP = "kdbench.sweep"  #: the sweep a run was made by
    CHECKPOINT = "kdbench.checkpoint"  #: absolute path of a student run's checkpoint (``last.pt``: "student", "method")
    DEVICE = "runtime.device"
    PRECISION = "runtime.precision"
    #: in a run ``kdbench eval`` made (role ``Role.EVAL``): the recipe section the weights it evaluated are ("student" or "teacher")
    EVALUATED = "kdbench.evaluated"


class Role:
    STUDENT = "student"
    TEACHER = "teacher"
    STUDY = "study"
    EVAL = "eval"  #: a run ``kdbench eval`` made for weights that belong to no run in the store


class Metric:
    """Run metrics. The final evaluation is logged at the last step under the bare names; the
    evaluations during training under ``val/``."""

    MIOU = "miou"
    PIXEL_ACC = "pixel_acc"
    VAL_MIOU = "val/miou"
    VAL_PIXEL_ACC = "val/pixel_acc"
    LR = "lr"
    IMAGES_PER_S = "throughput/images_per_s"
    SKIPPED_STEPS = "train/skipped_steps"  #: steps with a non-finite loss that updated nothing (train.on_nonfinite=skip)
    SELECTED_STEP = "selected_step"  #: train.select=best: the step whose weights the run reports
    PARAMS = "model/params"  #: parameters of the trained model (the student's, in a student run)
    #: its multiply-adds on one image at the training crop (papers' "FLOPs"; kdbench.models.complexity)
    MULTIPLY_ADDS = "model/multiply_adds"
    LOSS_TOTAL = "loss/total"
    IOU_PREFIX = "iou/"
    LOSS_PREFIX = "loss/"
    #: ``kdbench eval``'s results: ``eval/SETTING/miou``, ``eval/SETTING/pixel_acc``, ``eval/SETTING/iou/CLASS``
    EVAL_PREFIX = "eval/"

    @staticmethod
    def iou(class_name: str) -> str:
        return f"{Metric.IOU_PREFIX}{class_name}"

    @staticmethod
    def eval_setting(scales: Sequence[float], flip: bool) -> str:
        """The name of an evaluation setting: the scales, then ``_flip`` where flipped images are averaged
        too: ``s1``, ``s1_flip``, ``s0.5_0.75_1_1.25_1.5_1.75_flip``."""
        return "s" + "_".join(f"{s:g}" for s in scales) + ("_flip" if flip else "")

    @staticmethod
    def evaluation(setting: str, name: str) -> str:
        """Metric ``name`` (``MIOU``, ``PIXEL_ACC``, ``iou(CLASS)``) of a ``kdbench eval`` at ``setting``,
        e.g. ``eval/s1_flip/miou``: never the bare name the run's own final evaluation has."""
        return f"{Metric.EVAL_PREFIX}{setting}/{name}"

    @staticmethod
    def loss(term: str) -> str:
        return f"{Metric.LOSS_PREFIX}{term}"


class Param:
    """Keys of the flattened recipe that readers use."""

    METHOD = "method.name"
    PRESET = "method.preset"
    METHOD_PARAMS_PREFIX = "method.params."
    SEED = "seed"
    BENCHMARK = "benchmark"
    DATASET = "data.dataset"
    ITERATIONS = "train.iterations"
    BATCH_SIZE = "train.batch_size"
    #: recipe keys (a key or a whole section) that are not part of a run's setting: compared on
    #: their own (seed, method), or not changing the numbers (paths, logging, devices), or implied by
    #: the method (a teacher's CBAM taps). Runs that differ only here are reruns of one setting.
    NOT_SETTING = (
        "seed",
        "method",
        "methods",
        "teacher",
        "output_dir",
        "cache_dir",
        "tracking",
        "runtime",
        "data.root",
        "data.workers",
        "train.log_interval",
        "train.checkpoint_interval",
        "train.eval_interval",
        "eval.batch_size",
    )


class RunCol:
    """Columns MLflow itself puts in a ``search_runs`` frame."""

    RUN_ID = "run_id"
    EXPERIMENT_ID = "experiment_id"
    STATUS = "status"
    START = "start_time"
    END = "end_time"
    FINISHED = "FINISHED"


class Artifact:
    RECIPE = "recipe.yaml"
    CONFUSION = "confusion_matrix.json"
    METRICS = "metrics.json"
    MODEL = "model.pt"
    RUN_LOG = "run.log"  #: every logged value as plain text lines, and how the run ended
    FIGURES = "figures"  #: folder of the figures ``kdbench plot`` made from a run
    #: folder of ``kdbench eval``'s results, ``SETTING.json`` each (metrics, confusion matrix, checkpoint, recipe hash)
    EVALUATIONS = "evaluations"


def encode_param(value: Any) -> str:
    """How a recipe value is written as an MLflow param (MLflow keeps 6000 characters)."""
    s = json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)
    return s[:6000]


def decode_param(text: Any) -> Any:
    """The value ``encode_param`` wrote: JSON where it parses (numbers, lists, booleans), else the string."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


# ---------------------------------------------------------------------------------------------
# reading: mlflow.search_runs columns


def tag_col(name: str) -> str:
    return f"tags.{name}"


def param_col(name: str) -> str:
    return f"params.{name}"


def metric_col(name: str) -> str:
    return f"metrics.{name}"


def column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A column of a ``search_runs`` frame, or all-NaN where no run has it (MLflow leaves out a
    column no run logged)."""
    import pandas as pd

    return frame[name] if name in frame.columns else pd.Series(math.nan, index=frame.index, dtype=object)


def search_runs(experiments: list[str] | None = None, filter_string: str = "", uri: str | None = None) -> pd.DataFrame:
    """The runs of the experiments (all kdbench experiments when None) as one DataFrame, newest first."""
    import mlflow

    from kdbench.tracking import open_store

    open_store(uri)
    if experiments is None:
        experiments = [e.name for e in mlflow.search_experiments() if e.name.startswith("kdbench-")]
        if not experiments:
            import pandas as pd

            return pd.DataFrame()
    return mlflow.search_runs(experiment_names=experiments, filter_string=filter_string, output_format="pandas")
