"""Recipes: one YAML file says everything about a run; nothing is hidden in scripts.

A recipe is parsed with ``read_yaml`` (safe YAML that also reads ``1e-3`` as a number), patched with
``--set a.b=value`` overrides, and turned into frozen dataclasses. Every key is checked (unknown key, wrong type, impossible value, missing
file) before any work starts, and a problem is one ``UserError`` line naming the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kdbench.errors import UserError, did_you_mean
from kdbench.outputs import OUTPUT_ROOT

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; every ML user writes learning rates that way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def read_yaml(text: str) -> Any:
    """``yaml.safe_load`` that also reads scientific notation without a dot (``1e-3``) as a float."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
DEFAULT_RECIPE = "default"


#: metadata of a key that says how a run copes, not what it computes: hashes (run folders, sweep
#: cells, cached teachers) leave it out, so adding such a key keeps every existing hash
UNHASHED = {"hashed": False}
#: metadata of a key added after runs were made: hashes see it only when it differs from its
#: default, so a recipe that leaves it alone keeps the hash (cached teacher, sweep cells) it had
ADDED = {"hashed": "unless_default"}


@dataclass(frozen=True)
class SyntheticConfig:
    """Size of the embedded synthetic dataset (see kdbench.data.synthetic)."""

    num_train: int = 1200
    num_val: int = 200
    image_size: int = 64
    seed: int = 0
    #: probability that a training object of a confused class (hexagon, star) is labelled as its
    #: look-alike (disc, triangle); the validation labels stay clean
    label_noise: float = field(default=0.0, metadata=ADDED)
    #: the same for the labels a teacher trained by kdbench learns from (0: the clean labels)
    teacher_label_noise: float = field(default=0.0, metadata=ADDED)

    def generator_args(self) -> dict[str, Any]:
        """The generator's arguments (``kdbench.data.synthetic.ensure_synthetic``): every key but the
        teacher's label noise, which ``teacher_recipe`` puts in ``label_noise`` for a teacher."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "teacher_label_noise"}


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["synthetic", "voc", "cityscapes"] = "synthetic"
    #: dataset folder; empty means $KDBENCH_VOC_ROOT / $KDBENCH_CITYSCAPES_ROOT (synthetic: the cache)
    root: str | None = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    #: VOC: train on the SBD-augmented list (train_aug.txt, 10,582 images) when it is present
    use_sbd: bool = True
    #: fraction of the training split held out for tuning (never the split tables report)
    holdout_fraction: float = 0.0
    scale_range: tuple[float, float] = (0.5, 2.0)
    #: "relative": scale_range holds factors of each image's own size; "short_side": it holds the
    #: shorter side's length in pixels, drawn as an integer (pytorch-deeplab-xception's RandomScaleCrop)
    scale_mode: Literal["relative", "short_side"] = field(default="relative", metadata=ADDED)
    #: relative mode: > 0 draws the factor from low, low + step, ..., high instead of uniformly
    #: (CIRKD's loaders: 0.5 + randint(0, 15) / 10, i.e. step 0.1 over [0.5, 2.0])
    scale_step: float = field(default=0.0, metadata=ADDED)
    #: label of the mask pixels that padding to the crop adds: 255 ignores them; the released AttnFD
    #: code pads VOC masks with 0 (background) and Cityscapes masks with 255
    pad_label: int = field(default=255, metadata=ADDED)
    #: probability of a Gaussian blur of a training image, radius (sigma) uniform in [0, 1) (the
    #: released AttnFD code: 0.5)
    blur: float = field(default=0.0, metadata=ADDED)
    flip: bool = True
    #: "imagenet": RGB mean/std; "cirkd_bgr": CIRKD's BGR mean subtraction on 0-255 pixels
    normalize: Literal["imagenet", "cirkd_bgr"] = "imagenet"
    #: loader processes; auto: none on a CPU, the machine's cores shared by its GPU processes on a GPU
    workers: int | Literal["auto"] = "auto"


@dataclass(frozen=True)
class ModelConfig:
    #: deeplabv3plus / deeplabv3 on any timm backbone, or a released model exactly:
    #: deeplabv3plus_attnfd (AttnFD's code, its three CBAMs included), deeplabv3_cirkd (CIRKD's, v1s stem)
    arch: Literal["deeplabv3plus", "deeplabv3", "deeplabv3plus_attnfd", "deeplabv3_cirkd"] = "deeplabv3plus"
    backbone: str = "resnet18"
    output_stride: Literal[8, 16] = 16
    #: false: random init; true: timm's weights (needs network); a path: a local backbone state_dict
    pretrained: bool | str = False
    aspp_channels: int = 256
    decoder_channels: int = 256
    low_channels: int = 48
    #: CBAM inside the forward pass at these taps (AttnFD's "pretrained" teacher attention)
    attention_taps: tuple[str, ...] = ()
    #: deeplabv3plus_attnfd only: false runs the released distillation path (train_kd.py calls
    #: extract_feature, which skips the ASPP dropout that forward applies)
    aspp_dropout: bool = field(default=True, metadata=ADDED)


@dataclass(frozen=True)
class TeacherConfig(ModelConfig):
    #: a trained teacher; empty: kdbench trains one from this recipe once and caches it
    checkpoint: str | None = None
    #: training budget of a teacher trained by kdbench (batch size, crop, optimiser from `train`)
    iterations: int = 1000
    lr: float | None = None
    seed: int = 0


@dataclass(frozen=True)
class StudentConfig(ModelConfig):
    #: seed of the student's initial weights; empty: the run's seed. Papers start every seed of a
    #: comparison from the same ImageNet backbone; a fixed init_seed gives a student trained from
    #: scratch that protocol. The run's seed still sets the data order, augmentation, dropout and
    #: the method's own modules
    init_seed: int | None = field(default=None, metadata=ADDED)


@dataclass(frozen=True)
class MethodConfig:
    name: str = "kd"
    #: named combination of options (see `kdbench methods`); empty: the method's default
    preset: str | None = None
    #: hyper-parameters: every other key of the recipe's method section
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = 400
    batch_size: int = 16
    crop_size: tuple[int, int] = (64, 64)
    #: "sgd" (the papers' choice) or "adamw" (learns faster from scratch: the CPU benchmark)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    #: the head (everything but the backbone) learns this many times faster
    head_lr_mult: float = 10.0
    #: evaluate on the val split every N iterations (0: only at the end)
    eval_interval: int = 0
    #: write a resumable checkpoint every N iterations (0: only at the end)
    checkpoint_interval: int = 100
    log_interval: int = 10
    #: a step whose loss is NaN or infinite: "stop" the run (naming the step and the term; the last
    #: checkpoint stays the last good one), or "skip" its update (counted in `train/skipped_steps`;
    #: waits for each step's loss, so no CUDA graph of the step)
    on_nonfinite: Literal["stop", "skip"] = field(default="stop", metadata=UNHASHED)
    #: which weights a run ends with and reports: "last", or "best": those of the evaluation (every
    #: eval_interval, and the end) with the highest val mIoU, as the released AttnFD code reports its
    #: best epoch. Choosing on the split that is reported flatters the number: say so in tables
    select: Literal["last", "best"] = field(default="last", metadata=ADDED)
    #: divide the cross-entropy (a mean over pixels) by the batch size once more, as
    #: pytorch-deeplab-xception's SegmentationLosses(batch_average=True) does: the released AttnFD
    #: code's task loss is 1/6 of the usual at batch 6, against its distillation term
    ce_batch_average: bool = field(default=False, metadata=ADDED)


@dataclass(frozen=True)
class EvalConfig:
    flip: bool = False
    scales: tuple[float, ...] = (1.0,)
    #: resize image and mask so the shorter side has this many pixels before evaluating (bilinear /
    #: nearest), as pytorch-deeplab-xception's FixedResize; the metric is counted at that size.
    #: Empty: every image at its own size
    resize_short: int | None = field(default=None, metadata=ADDED)
    #: evaluation batch size: up to this many images of one size per batch (a VOC or Cityscapes
    #: split's sizes are read from its file headers; other splits must hold images of one size).
    #: The metric does not depend on it
    batch_size: int = 1


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the run computes (kdbench.runtime). Not part of a cached teacher's key."""

    #: auto: this process's GPU if there is one, else the CPU; cpu; cuda; cuda:N
    device: str = "auto"
    #: auto: bf16 on a GPU that supports it, else fp32. Losses are computed in float32 in every mode
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    #: torch.compile the student, the teacher and the method (slow first steps, faster after)
    compile: bool = False
    #: torch.compile the method's forward alone (its loss terms fused into a few kernels); unlike
    #: ``compile`` it keeps the step's CUDA graph. auto: on a GPU (H100, VOC shapes: AttnFD 1.41x ->
    #: 1.19x the floor), off on a CPU (the committed CPU results stay as they are)
    compile_method: bool | Literal["auto"] = field(default="auto", metadata=ADDED)
    #: channels-last memory format for models and images; auto: on a GPU
    channels_last: bool | Literal["auto"] = "auto"
    #: multi-GPU: BatchNorm statistics over the whole global batch (CUDA only)
    sync_batchnorm: bool = False
    #: cuDNN times the convolution algorithms for each new input shape and keeps the fastest: for
    #: training's fixed crop
    cudnn_benchmark: bool = True
    #: the same for evaluation, whose images come in many sizes: each new size is timed once per
    #: process, and a run evaluates the same sizes at every evaluation
    eval_cudnn_benchmark: bool = field(default=False, metadata=ADDED)
    #: capture the frozen teacher's forward as a CUDA graph (removes its kernel-launch cost)
    cuda_graphs: bool = True


@dataclass(frozen=True)
class TrackingConfig:
    #: empty: $MLFLOW_TRACKING_URI, else OUTPUT_DIR/mlflow.db (kdbench.outputs)
    uri: str | None = None
    #: MLflow experiment; empty: "kdbench-<benchmark>"
    experiment: str | None = None
    log_checkpoint: bool = True


@dataclass(frozen=True)
class Recipe:
    #: the benchmark family this recipe belongs to: one MLflow experiment per benchmark
    benchmark: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    #: this benchmark's settings for particular methods ({method: {hyper-parameter: value}}), used
    #: whenever that method runs: over its preset, under the method section's own keys and --set
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata=UNHASHED)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    seed: int = 0
    #: the output root: run folders (checkpoints), the default MLflow store and Optuna work lists
    #: (kdbench.outputs lists what is written where)
    output_dir: str = field(default=OUTPUT_ROOT, metadata=UNHASHED)
    #: where generated data and trained teachers are cached; empty: $KDBENCH_CACHE or ~/.cache/kdbench
    cache_dir: str | None = field(default=None, metadata=UNHASHED)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists, not tuples): what YAML, MLflow params and hashes see."""
        return _plain(dataclasses.asdict(self))

    def hashed_dict(self) -> dict[str, Any]:
        """``to_dict`` without the UNHASHED keys: what a hash sees."""
        return _plain(_hashed(self))

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.hashed_dict(), sort_keys=True).encode()).hexdigest()[:12]


def _hashed(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _hashed(getattr(obj, f.name)) for f in dataclasses.fields(obj) if _hashes(f, getattr(obj, f.name))}
    return obj


def _hashes(f: dataclasses.Field[Any], value: Any) -> bool:
    rule = f.metadata.get("hashed", True)
    if rule == "unless_default":
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        return _plain(value) != _plain(default)
    return bool(rule)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# dict -> dataclass, checking every key and type


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (tuple, list):
        return "a list"
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "empty")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a section (mapping), got {value!r}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, key)
            except UserError:
                continue
        raise UserError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise UserError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise UserError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is type(None):
        if value is not None:
            raise UserError(f"{key}: expected empty, got {value!r}")
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and type(value) is not tp:
        raise UserError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if cls is MethodConfig:  # the method's hyper-parameters sit beside name and preset
        data = {**data}
        params = {k: data.pop(k) for k in list(data) if k not in ("name", "preset", "params")}
        data["params"] = {**data.get("params", {}), **params}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise UserError(f"{full}: unknown key ({did_you_mean(key, names)}known keys here: {', '.join(names)})")
        kwargs[key] = _convert(value, hints[key], full)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# loading


def recipe_path(name_or_path: str) -> Path:
    """A bare name means recipes/NAME.yaml; anything else is a path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists() or "/" in name_or_path:
        if not p.is_file():
            raise UserError(f"--recipe: no recipe file {p}")
        return p
    p = RECIPES_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        known = ", ".join(sorted(q.stem for q in RECIPES_DIR.glob("*.yaml")))
        raise UserError(f"--recipe: no recipe named {name_or_path!r} (shipped recipes: {known})")
    return p


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value``; the value is read as YAML, so 0.1, true, [1, 2] and strings all work."""
    if "=" not in text:
        raise UserError(f"--set {text}: expected KEY=VALUE, e.g. --set train.lr=0.02")
    key, raw = text.split("=", 1)
    try:
        value = read_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _apply(raw: dict[str, Any], path: list[str], value: Any) -> None:
    node = raw
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
        node = child
    node[path[-1]] = value


def load_recipe(
    name_or_path: str | None = None,
    overrides: list[str] = (),
    *,
    method: str | None = None,
    preset: str | None = None,
    seed: int | None = None,
) -> Recipe:
    """Load, override, validate. A ``method`` other than the recipe's starts from that method's own
    defaults (the recipe's hyper-parameters belong to its method); ``--set`` applies after."""
    path = recipe_path(name_or_path or DEFAULT_RECIPE)
    try:
        raw = read_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if raw is None:  # an empty file would otherwise run every default silently
        raise UserError(f"{path}: the recipe file is empty; copy a recipe from recipes/ to start from")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}")
    section = raw.get("method") if isinstance(raw.get("method"), dict) else {}
    if method is not None and method != section.get("name", MethodConfig.name):
        raw["method"] = {"name": method}
    if preset is not None:
        _apply(raw, ["method", "preset"], preset)
    if seed is not None:
        raw["seed"] = seed
    for text in overrides:
        _apply(raw, *parse_override(text))
    section = raw.get("method") if isinstance(raw.get("method"), dict) else {}
    per_method = raw.get("methods") if isinstance(raw.get("methods"), dict) else {}
    benchmark_settings = per_method.get(section.get("name", MethodConfig.name))
    if isinstance(benchmark_settings, dict):
        raw["method"] = {**benchmark_settings, **section}
    return validate(_build(Recipe, raw, ""))


DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def check_device_setting(setting: str) -> str:
    """The spelling of ``runtime.device`` (checked when a recipe loads, before any GPU is looked for)."""
    if not DEVICE_PATTERN.match(setting):
        raise UserError(f"runtime.device: expected auto, cpu, cuda or cuda:N, got {setting!r}")
    return setting


def validate(recipe: Recipe) -> Recipe:
    """Impossible values and missing files; also resolves the method section against its class."""
    import timm

    from kdbench.methods import get_method_class, registry, resolve_config

    t, d = recipe.train, recipe.data
    positive = {
        "train.iterations": t.iterations,
        "train.batch_size": t.batch_size,
        "train.lr": t.lr,
        "train.crop_size[0]": t.crop_size[0],
        "train.crop_size[1]": t.crop_size[1],
        "teacher.iterations": recipe.teacher.iterations,
        "eval.batch_size": recipe.eval.batch_size,
        "data.synthetic.num_train": d.synthetic.num_train,
        "data.synthetic.num_val": d.synthetic.num_val,
        "data.synthetic.image_size": d.synthetic.image_size,
        "student.aspp_channels": recipe.student.aspp_channels,
        "teacher.aspp_channels": recipe.teacher.aspp_channels,
    }
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"{key}: must be positive, got {value}")
    nonneg = {
        "train.weight_decay": t.weight_decay,
        "train.momentum": t.momentum,
        "train.poly_power": t.poly_power,
        "train.eval_interval": t.eval_interval,
        "train.checkpoint_interval": t.checkpoint_interval,
    }
    if d.workers != "auto":
        nonneg["data.workers"] = d.workers
    for key, value in nonneg.items():
        if value < 0:
            raise UserError(f"{key}: must be zero or more, got {value}")
    if not 0.0 <= d.holdout_fraction < 1.0:
        raise UserError(f"data.holdout_fraction: must be in [0, 1), got {d.holdout_fraction}")
    if not 0 < d.scale_range[0] <= d.scale_range[1]:
        raise UserError(f"data.scale_range: expected 0 < low <= high, got {list(d.scale_range)}")
    if d.scale_mode == "short_side" and any(v != int(v) or v < 1 for v in d.scale_range):
        raise UserError(f"data.scale_range: with scale_mode short_side it holds pixel lengths (whole numbers >= 1), got {list(d.scale_range)}")
    if d.scale_step < 0 or (d.scale_step > 0 and d.scale_mode != "relative"):
        raise UserError(f"data.scale_step: a factor step >= 0 for scale_mode relative, got {d.scale_step} with scale_mode {d.scale_mode}")
    probabilities = {
        "data.blur": d.blur,
        "data.synthetic.label_noise": d.synthetic.label_noise,
        "data.synthetic.teacher_label_noise": d.synthetic.teacher_label_noise,
    }
    for key, value in probabilities.items():
        if not 0.0 <= value <= 1.0:
            raise UserError(f"{key}: a probability in [0, 1], got {value}")
    if not 0 <= d.pad_label <= 255:
        raise UserError(f"data.pad_label: a label id in [0, 255] (255: ignored), got {d.pad_label}")
    if recipe.eval.resize_short is not None and recipe.eval.resize_short < 1:
        raise UserError(f"eval.resize_short: a length in pixels >= 1 (or empty), got {recipe.eval.resize_short}")
    if not recipe.eval.scales or min(recipe.eval.scales) <= 0:
        raise UserError(f"eval.scales: expected positive scales, got {list(recipe.eval.scales)}")
    check_device_setting(recipe.runtime.device)
    if t.nesterov and t.momentum == 0:
        raise UserError("train.nesterov: Nesterov momentum needs train.momentum > 0")
    for section in ("teacher", "student"):
        m = getattr(recipe, section)
        bad = set(m.attention_taps) - {"backbone", "encoder", "decoder"}
        if bad:
            raise UserError(f"{section}.attention_taps: unknown taps {sorted(bad)}; use backbone, encoder, decoder")
        if not timm.is_model(m.backbone):  # here, not when the model is built after the teacher's training
            hint = did_you_mean(m.backbone, timm.list_models(), n=3)
            raise UserError(f"{section}.backbone: timm has no model {m.backbone!r} ({hint}see timm.list_models('resnet*'))")
        if not m.aspp_dropout and m.arch != "deeplabv3plus_attnfd":
            raise UserError(f"{section}.aspp_dropout: false is the released AttnFD code's distillation path; only arch deeplabv3plus_attnfd has it")
        if isinstance(m.pretrained, str) and not Path(m.pretrained).expanduser().is_file():
            raise UserError(f"{section}.pretrained: no weights file {m.pretrained}; give its path with --set {section}.pretrained=PATH (false: random init)")
    ckpt = recipe.teacher.checkpoint
    if ckpt and not Path(ckpt).expanduser().is_file():
        raise UserError(f"teacher.checkpoint: no checkpoint file {ckpt} (leave it empty to train one)")
    if d.root and not Path(d.root).expanduser().is_dir():
        raise UserError(f"data.root: no folder {d.root}")
    for name, settings in recipe.methods.items():
        if name not in registry():
            raise UserError(f"methods.{name}: unknown method; choose one of {', '.join(registry())}")
        if not isinstance(settings, dict):
            raise UserError(f"methods.{name}: expected a mapping of hyper-parameters, got {settings!r}")
        per_method_config(recipe, name)
    preset, cfg = resolve_config(recipe.method.name, recipe.method.preset, recipe.method.params)
    # the resolved method (preset + every option) is part of the recipe, so it is logged and hashed
    resolved = MethodConfig(name=recipe.method.name, preset=preset, params=_plain(dataclasses.asdict(cfg)))
    needs = get_method_class(recipe.method.name).teacher_requirements(cfg)
    teacher = dataclasses.replace(recipe.teacher, **needs) if needs else recipe.teacher
    if needs and recipe.teacher.checkpoint and teacher != recipe.teacher:
        wanted = ", ".join(f"teacher.{k}={v}" for k, v in needs.items())
        raise UserError(f"teacher.checkpoint: method {recipe.method.name!r} as configured needs a teacher trained with {wanted}")
    return dataclasses.replace(recipe, method=resolved, teacher=teacher)


def per_method_config(recipe: Recipe, name: str, preset: str | None = None) -> Any:
    """The options method ``name`` gets from the recipe's ``methods:`` section, at ``preset`` (default:
    the section's own preset, else the method's); what ``kdbench run --method NAME`` starts from."""
    from kdbench.methods import resolve_config

    settings = dict(recipe.methods.get(name, {}))
    own = settings.pop("preset", None)
    return resolve_config(name, preset or own, settings, where=f"methods.{name}")[1]


def teacher_recipe(recipe: Recipe) -> Recipe:
    """The recipe a teacher trained by kdbench learns from: the student's, with the synthetic set's
    teacher labels (``data.synthetic.teacher_label_noise``) in place of the student's."""
    s = recipe.data.synthetic
    if recipe.data.dataset != "synthetic" or s.label_noise == s.teacher_label_noise:
        return recipe
    data = dataclasses.replace(recipe.data, synthetic=dataclasses.replace(s, label_noise=s.teacher_label_noise))
    return dataclasses.replace(recipe, data=data)


def teacher_key(recipe: Recipe) -> str:
    """Cache key of a teacher trained by kdbench: what it is, what it learns from and how."""
    from kdbench.data.synthetic import GENERATOR_VERSION

    r = teacher_recipe(recipe).hashed_dict()
    train = {k: v for k, v in r["train"].items() if k not in ("iterations", "eval_interval", "checkpoint_interval", "log_interval", "select")}
    teacher = {k: v for k, v in r["teacher"].items() if k != "checkpoint"}
    data = {k: v for k, v in r["data"].items() if k not in ("workers", "holdout_fraction")}
    if recipe.data.dataset == "synthetic":  # a teacher of other images is another teacher
        data["generator_version"] = GENERATOR_VERSION
    blob = json.dumps({"teacher": teacher, "data": data, "train": train}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b": v}: how a recipe becomes MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def dump_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
