"""Every bad input through the real CLI is one line `error: ...` on stderr, exit code 2, no traceback.

Each case is a process of its own running the `kdbench` entry point with the case's argv, working
folder and environment, forked from a server that imported kdbench once (tests/cli_fork.py: the
same code path as the installed script, without seconds of imports per case). They run
concurrently, launched once per module by the `results` fixture; the parametrized test of a case
reads its result. Usage errors already covered by tests/test_cli.py are not repeated here.
"""

from __future__ import annotations

import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.cli_fork import ForkedCLI, Result, store_env
from tests.pristine_store import seed_store

#: the set-up run every case marked `after_run` needs (a teacher cached, a student checkpoint, a store)
RUN_SETS = ["--set", "teacher.iterations=2", "--set", "train.iterations=2", "--set", "train.eval_interval=0", "--set", "train.checkpoint_interval=1"]
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens there
SETUP = "set-up run"


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    #: substrings the one stderr line must hold (the key, the value, what to do)
    expect: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    #: needs the module's set-up run (a cached teacher, a student checkpoint, a store with runs)
    after_run: bool = False
    #: seconds the command may take at most (a hang is a failure too)
    within: float | None = None


def case(id: str, args: str | list[str], *expect: str, env: dict[str, str] | None = None, after_run: bool = False, within: float | None = None) -> Case:
    return Case(id, tuple(args.split() if isinstance(args, str) else args), expect, env or {}, after_run, within)


TINY = "run --recipe tiny --quiet"


def voc(*sets: str) -> list[str]:
    """A plain-student run of the tiny recipe on a VOC-layout folder (built by `_inputs`)."""
    args = ["run", "--recipe", "tiny", "--quiet", "--method", "none", "--set", "data.dataset=voc", "--set", "train.iterations=1", "--set", "train.batch_size=2"]
    return args + [a for s in sets for a in ("--set", s)]


CASES = [
    # --- usage errors of the commands tests/test_cli.py does not try
    case("tune-unknown-option", "tune --method kd --param temperature --bogus", "No such option: --bogus"),
    case("sweep-unknown-option", "sweep -m kd --bogus", "No such option: --bogus"),
    case("table-unknown-option", "table --bogus", "No such option: --bogus"),
    case("plot-unknown-option", "plot per-class --bogus", "No such option: --bogus"),
    case("bench-unknown-option", "bench --bogus", "No such option: --bogus"),
    case("teacher-unknown-option", "teacher --methd kd", "No such option: --methd"),
    case("methods-unknown-option", "methods --bogus", "No such option: --bogus"),
    case("tune-missing-value", "tune --method kd --param", "'--param' requires an argument"),
    case("table-missing-value", "table --format", "'--format' requires an argument"),
    case("tune-bad-int", "tune --method kd --param temperature --trials 2.5", "Invalid value for '--trials'", "integer"),
    case("set-bad-float", f"{TINY} --set train.lr=0.1.2", "train.lr", "expected float", "0.1.2"),
    case("plot-unknown-kind", "plot pie", "unknown kind 'pie'", "per-class"),
    case("plot-missing-kind", "plot", "Missing argument 'kind'", "plot --help"),
    # --- recipe files
    case("yaml-malformed", "run --recipe malformed.yaml", "malformed.yaml", "not valid YAML"),
    case("yaml-only-comment", "run --recipe comment.yaml", "comment.yaml", "empty", "copy a recipe"),
    case("yaml-list", "run --recipe list.yaml", "list.yaml", "mapping of sections", "list"),
    case("yaml-typo-section", "run --recipe typo.yaml", "trian: unknown key", "did you mean 'train'"),
    case("unknown-key", f"{TINY} --set train.lrr=0.1", "train.lrr: unknown key", "did you mean 'lr'"),
    case("wrong-type-int", f"{TINY} --set train.iterations=ten", "train.iterations", "expected int", "'ten'"),
    case("iterations-zero", f"{TINY} --set train.iterations=0", "train.iterations: must be positive, got 0"),
    case("batch-size-zero", f"{TINY} --set train.batch_size=0", "train.batch_size: must be positive, got 0"),
    case("crop-size-zero", f"{TINY} --set train.crop_size=[0,32]", "train.crop_size[0]: must be positive, got 0"),
    case("lr-negative", f"{TINY} --set train.lr=-0.1", "train.lr: must be positive, got -0.1"),
    case("unknown-method-section", f"{TINY} --set methods.magic.alpha=1", "methods.magic: unknown method"),
    case("unknown-preset", f"{TINY} --preset nosuch", "method.preset", "no preset 'nosuch'", "cirkd"),
    case("unknown-hparam", f"{TINY} --set method.temprature=2", "method.temprature: unknown hyper-parameter", "did you mean 'temperature'"),
    case("kd-temperature-negative", f"{TINY} --set method.temperature=-1", "temperature", "> 0", "-1"),
    case("kd-weight-negative", f"{TINY} --set method.weight=-2", "weight", ">= 0", "-2"),
    case("attnfd-alpha-negative", f"{TINY} --method attnfd --set method.alpha=-0.5", "alpha", ">= 0", "-0.5"),
    case("unknown-student-backbone", f"{TINY} --set student.backbone=resnet999", "student.backbone", "'resnet999'", "timm"),
    case("unknown-teacher-backbone", f"{TINY} --set teacher.backbone=resnt18", "teacher.backbone", "'resnt18'", "resnet18"),
    case("unknown-arch", f"{TINY} --set student.arch=unet", "student.arch", "'deeplabv3plus'", "'unet'"),
    case("output-stride-32", f"{TINY} --set teacher.output_stride=32", "teacher.output_stride", "8, 16", "32"),
    # --- data
    case("data-root-missing", voc("data.root=no/such/folder"), "data.root: no folder no/such/folder"),
    case("data-missing-files", voc("data.root=voc_missing"), "1 of 2 files listed", "missing", "b.jpg"),
    case("data-empty-split", voc("data.root=voc_empty_split"), "train.txt lists no images"),
    case("data-not-an-image", voc("data.root=voc_not_image"), "JPEGImages/a.jpg", "not an image"),
    case("data-label-out-of-range", voc("data.root=voc_bad_label"), "SegmentationClass/a.png", "[50]", "21 classes", "255"),
    # the first image of a split is checked when the set is scanned; a later one when a loader worker reads it
    case("data-bad-label-in-worker", voc("data.root=voc_worker", "data.workers=1"), "SegmentationClass/b.png", "[50]", "21 classes", env={"MLFLOW_TRACKING_URI": "sqlite:///worker.db"}),
    case("data-size-mismatch", voc("data.root=voc_size"), "JPEGImages/a.png", "SegmentationClass/a.png", "(32, 32)", "(24, 24)"),
    # --- where outputs go (/proc: not writable, even by root)
    case("output-dir-unwritable", f"{TINY} --method none --set output_dir=/proc/kdbench-out", "output_dir: cannot write in /proc/kdbench-out", "--set output_dir=DIR"),
    case("cache-dir-unwritable", f"{TINY} --method none --set cache_dir=/proc/kdbench-cache", "cache_dir: cannot write in /proc/kdbench-cache", "--set cache_dir=DIR"),
    # --- teacher checkpoints
    case("teacher-ckpt-text", f"{TINY} --set teacher.checkpoint=text.pt", "teacher.checkpoint: cannot read text.pt", "truncated, or of another format"),
    case("teacher-ckpt-truncated", f"{TINY} --set teacher.checkpoint=truncated.pt", "teacher.checkpoint: cannot read truncated.pt", "truncated, or of another format"),
    case("teacher-ckpt-other-arch", f"{TINY} --set teacher.checkpoint=arch.pt", "arch.pt has arch='deeplabv3'", "'deeplabv3plus'"),
    case("teacher-ckpt-other-classes", f"{TINY} --set teacher.checkpoint=classes.pt", "classes.pt has num_classes=5", "9"),
    case("teacher-ckpt-misfit", f"{TINY} --set teacher.checkpoint=misfit.pt", "misfit.pt does not fit teacher", "mis-shaped"),
    case("teacher-ckpt-pickled-code", f"{TINY} --set teacher.checkpoint=code.pt", "teacher.checkpoint: code.pt holds pickled code", "PickledCode", "weights_only", "state_dict()"),
    case("student-pretrained-pickled-code", f"{TINY} --method none --set student.pretrained=code.pt", "pretrained: code.pt holds pickled code", "weights_only"),
    case("teacher-ckpt-bare-tensor", f"{TINY} --set teacher.checkpoint=tensor.pt", "tensor.pt", "not a model checkpoint"),
    # --- --resume of a run made with other settings
    case("resume-other-seed", [*TINY.split(), *RUN_SETS, "--seed", "1", "--resume"], "--resume: no checkpoint of this recipe", "run without --resume", after_run=True),
    case("resume-other-recipe-ckpt", [*TINY.split(), *RUN_SETS, "--seed", "2", "--resume"], "--resume:", "different recipe", "drop --resume", after_run=True),
    # --- an MLflow server that is not there: one line before any work, not MLflow's 4 minutes of retries
    # and a traceback (alone this fails in 8 s; 120 s leaves room for a loaded machine's Python start)
    case("mlflow-unreachable-run", TINY, "MLflow", UNREACHABLE, "MLFLOW_TRACKING_URI", env={"MLFLOW_TRACKING_URI": UNREACHABLE}, within=120),
    case("mlflow-unreachable-table", "table", "MLflow", UNREACHABLE, env={"MLFLOW_TRACKING_URI": UNREACHABLE}, within=120),
    # --- tune, sweep, table, plot, bench
    case("tune-bad-range", "tune -m kd --param temperature=1:x", "--param temperature=1:x", "'x' is not a number"),
    case("tune-unknown-param", "tune -m kd --param temprature", "'kd' has no hyper-parameter 'temprature'", "temperature"),
    case("tune-sampler", "tune -m kd --param temperature --sampler nonsense", "--sampler", "'nonsense'", "tpe"),
    case("sweep-bad-seeds", "sweep -m kd --seeds a,b", "--seeds", "'a,b'", "0-4"),
    case("sweep-unknown-method", "sweep -m magic --seeds 0", "unknown method 'magic'"),
    case("table-unknown-format", "table --format pdf", "--format", "'pdf'", "latex"),
    case("table-unknown-suffix", "table --out t.docx", "--out", "t.docx", "--format"),
    case("table-unknown-metric", "table --metric f1", "--metric", "'f1'", "miou"),
    case("table-no-store", "table", "no MLflow store at", "nostore.db", env={"MLFLOW_TRACKING_URI": "sqlite:///nostore.db"}),
    case("table-empty-store", "table", "no finished runs", "empty.db", env={"MLFLOW_TRACKING_URI": "sqlite:///empty.db"}),
    case("table-unknown-experiment", "table -e nosuch", "--experiment: no experiment 'nosuch'", "kdbench-tiny", after_run=True),
    case("plot-no-store", "plot per-class", "no MLflow store at", "nostore.db", env={"MLFLOW_TRACKING_URI": "sqlite:///nostore.db"}),
    case("plot-unknown-run", "plot per-class --run 0123456789abcdef", "--run: no run '0123456789abcdef'", after_run=True),
    case("plot-images-for-per-class", "plot per-class --images 0", "--images", "per-class"),
    case("bench-steps-zero", "bench --recipe tiny --steps 0", "--steps", "at least 1"),
]


def _voc(root: Path, ids: dict[str, list[str]], image_size=(32, 32), label_size=(32, 32), label_value=1, ext=".png") -> None:
    """A tiny VOC-layout dataset: every id gets an image and a palette mask (value ``label_value``)."""
    from PIL import Image

    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "SegmentationClass").mkdir()
    for split, names in ids.items():
        (sets / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
        for n in names:
            Image.new("RGB", image_size[::-1], (120, 30, 200)).save(root / "JPEGImages" / f"{n}{ext}")
            mask = Image.new("P", label_size[::-1], label_value)
            mask.putpalette([0, 0, 0, 128, 0, 0] * 128)
            mask.save(root / "SegmentationClass" / f"{n}.png")


class PickledCode:
    """An object whose class lives in this file: loading it would run code, so weights_only must refuse it."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def _inputs(d: Path) -> None:
    """The bad files of the cases, written into the module's folder."""
    import torch

    from kdbench.models import build_model
    from kdbench.recipe import load_recipe

    (d / "malformed.yaml").write_text("train:\n  lr: [0.1, 0.2\n  iterations: 4\n")
    (d / "comment.yaml").write_text("# a recipe still to be written\n")
    (d / "list.yaml").write_text("- train\n- data\n")
    (d / "typo.yaml").write_text("benchmark: tiny\ntrian:\n  lr: 0.1\n")
    # data
    _voc(d / "voc_missing", {"train": ["a", "b"], "val": ["v"]})
    (d / "voc_missing" / "JPEGImages" / "b.png").unlink()
    _voc(d / "voc_empty_split", {"train": [], "val": ["v"]})
    _voc(d / "voc_not_image", {"train": ["a"], "val": ["v"]}, ext=".jpg")
    (d / "voc_not_image" / "JPEGImages" / "a.jpg").write_text("this is not an image\n")
    _voc(d / "voc_bad_label", {"train": ["a"], "val": ["v"]}, label_value=50)
    _voc(d / "voc_size", {"train": ["a"], "val": ["v"]}, label_size=(24, 24))
    _voc(d / "voc_worker", {"train": ["a", "b"], "val": ["v"]})
    shutil.copy(d / "voc_bad_label" / "SegmentationClass" / "a.png", d / "voc_worker" / "SegmentationClass" / "b.png")
    # teacher checkpoints
    recipe = load_recipe("tiny")
    teacher = build_model(recipe.teacher, 9)
    meta = {"arch": "deeplabv3plus", "backbone": recipe.teacher.backbone, "num_classes": 9, "attention_taps": []}
    torch.save({"model": teacher.state_dict(), "meta": meta}, d / "real.pt")
    (d / "truncated.pt").write_bytes((d / "real.pt").read_bytes()[:100])
    (d / "text.pt").write_text("these are not the weights you are looking for\n")
    torch.save({"model": teacher.state_dict(), "meta": {**meta, "arch": "deeplabv3"}}, d / "arch.pt")
    torch.save({"model": build_model(recipe.teacher, 5).state_dict(), "meta": {**meta, "num_classes": 5}}, d / "classes.pt")
    torch.save(build_model(recipe.student, 9).state_dict(), d / "misfit.pt")  # no meta: the shapes tell
    torch.save({"model": teacher.state_dict(), "meta": meta, "extra": PickledCode()}, d / "code.pt")
    torch.save(torch.zeros(3), d / "tensor.pt")


def _after_run(d: Path) -> None:
    """Checkpoints of other recipes where --resume looks (from the set-up run's last.pt)."""
    from kdbench.recipe import load_recipe

    sets = [s for s in RUN_SETS if s != "--set"]
    (last,) = (d / "kdbench-out").glob("kd-*/last.pt")
    target = d / "kdbench-out" / f"kd-{load_recipe('tiny', sets, seed=2).hash()}" / "last.pt"
    target.parent.mkdir(parents=True)
    shutil.copy(last, target)


def _env(d: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in store_env(d).items() if k not in ("KDBENCH_VOC_ROOT", "KDBENCH_CITYSCAPES_ROOT")}
    env.update(extra)
    return env


def _cli(cli: ForkedCLI, d: Path, args: tuple[str, ...], env: dict[str, str], timeout: float = 300) -> tuple[Result, float]:
    start = time.perf_counter()
    r = cli.run(args, d, _env(d, env), timeout)
    return r, time.perf_counter() - start


@pytest.fixture(scope="module")
def results(request, tmp_path_factory):
    """The selected cases (all, or those `-k` picks) run once, four at a time; the set-up run
    first, the cases that need it last."""
    wanted = {item.callspec.params["c"].id for item in request.session.items if item.module is sys.modules[__name__] and hasattr(item, "callspec")}
    cases = [c for c in CASES if c.id in wanted]
    d = tmp_path_factory.mktemp("bad_input")
    (d / "empty.db").write_bytes(b"")  # a zero-byte file: MLflow makes its tables on first use
    seed_store(d / "worker.db")  # the bad-label run's own store
    futures = {}
    cli = ForkedCLI(d / "cli")
    with ThreadPoolExecutor(max_workers=3) as pool:
        setup = pool.submit(_cli, cli, d, ("run", "--recipe", "tiny", "--quiet", *RUN_SETS), {}) if any(c.after_run for c in cases) else None
        _inputs(d)
        for c in cases:
            if not c.after_run:
                futures[c.id] = pool.submit(_cli, cli, d, c.args, c.env, 2 * c.within if c.within else 300)
        if setup is not None:
            r, _ = setup.result()
            if r.returncode == 0:
                _after_run(d)
            for c in cases:
                if c.after_run:
                    futures[c.id] = pool.submit(_cli, cli, d, c.args, c.env) if r.returncode == 0 else None
        out = {key: f.result() if f else None for key, f in futures.items()}
        out[SETUP] = setup.result() if setup else None
    shutil.rmtree(d / "cache", ignore_errors=True)
    return out


def test_cases_are_many_and_distinct():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_line(results, c):
    if results[c.id] is None:
        pytest.fail(f"the set-up run failed: {results[SETUP][0].stderr[-3000:]}")
    r, seconds = results[c.id]
    err = r.stderr.strip()
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert err and len(err.splitlines()) == 1, r.stderr
    assert err.startswith("error: "), err
    for part in c.expect:
        assert part in err, (part, err)
    if c.within is not None:
        assert seconds < c.within, (seconds, err)
