"""Trained models read back: a run's resolved recipe (its ``recipe.yaml`` artifact), where its weights
are (the run's ``kdbench.checkpoint`` tag, or the teacher's cache), and a model rebuilt from a
state_dict with every key checked. ``kdbench plot`` and ``kdbench eval`` both read runs this way.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdbench.errors import UserError
from kdbench.schema import Artifact


def run_recipe(run_id: str, overrides: Sequence[str] = (), what: str = "plot", fix: str = "pick another with --run") -> Any:
    """The resolved recipe a run logged (``recipe.yaml``), validated again, with ``overrides``
    (``--set`` values) on top. A run without one (it did not finish) is a UserError ending in ``fix``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from kdbench.recipe import load_recipe

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per user error, no bars
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.MlflowClient().download_artifacts(run_id, Artifact.RECIPE, tmp)
        except (MlflowException, OSError):
            raise UserError(f"{what}: run {run_id} has no {Artifact.RECIPE} artifact (it did not finish?); {fix}") from None
        return load_recipe(path, list(overrides))


def checkpoint_path(tagged: Any, recipe: Any) -> Path:
    """A student run's checkpoint: its ``Tag.CHECKPOINT`` value ``tagged``; for runs older than that
    tag, where ``kdbench.run`` puts it (relative to the working directory)."""
    if isinstance(tagged, str) and tagged:
        return Path(tagged)
    return Path(recipe.output_dir) / f"{recipe.method.name}-{recipe.hash()}" / "last.pt"


def teacher_path(recipe: Any) -> Path:
    """The recipe's teacher weights: its ``teacher.checkpoint``, else kdbench's cached teacher."""
    from kdbench.run import teacher_cache_path

    return Path(recipe.teacher.checkpoint).expanduser() if recipe.teacher.checkpoint else teacher_cache_path(recipe)


def model_from_state(cfg: Any, state: Any, num_classes: int, source: str, fix: str) -> Any:
    """The model of a recipe's ``student`` or ``teacher`` section ``cfg`` with the weights ``state``
    (eval mode, frozen, on the CPU). Weights of another model (a key missing, unexpected or of
    another shape) are a UserError: ``source`` does not fit ...; ``fix``."""
    from kdbench.models import build_model

    model = build_model(cfg, num_classes, pretrained=False)
    ref = model.state_dict()
    state = state if isinstance(state, dict) else {}
    differ = sorted(set(ref) ^ set(state)) + [k for k in ref if k in state and tuple(getattr(state[k], "shape", ())) != tuple(ref[k].shape)]
    if differ:
        raise UserError(
            f"{source} does not fit {cfg.arch}/{cfg.backbone} with {num_classes} classes "
            f"({len(differ)} keys missing, unexpected or of another shape, e.g. {differ[:3]}); {fix}"
        )
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)
