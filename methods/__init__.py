"""Distillation methods: one file per method, found automatically.

Every module in this package that defines a ``Method`` subclass with a ``name`` is registered
under that name; installed packages can add methods through the ``kdbench.methods`` entry-point
group. Adding a method is adding one file.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import pkgutil
import typing
from typing import Any

from kdbench.errors import UserError, did_you_mean

from .base import FeatureSpec, Method

_REGISTRY: dict[str, type[Method]] = {}


def _collect(module: Any) -> None:
    for obj in vars(module).values():
        if isinstance(obj, type) and issubclass(obj, Method) and obj is not Method and obj.name:
            _REGISTRY.setdefault(obj.name, obj)


def registry() -> dict[str, type[Method]]:
    """name -> Method class, for the methods of this package and of installed plug-ins."""
    if not _REGISTRY:
        for info in pkgutil.iter_modules(__path__):
            if info.name != "base":
                _collect(importlib.import_module(f"{__name__}.{info.name}"))
        for ep in importlib.metadata.entry_points(group="kdbench.methods"):
            obj = ep.load()
            _REGISTRY.setdefault(obj.name, obj)
    return dict(sorted(_REGISTRY.items()))


def get_method_class(name: str) -> type[Method]:
    methods = registry()
    if name not in methods:
        raise UserError(f"method: unknown method {name!r}; choose one of {', '.join(methods)}")
    return methods[name]


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check a YAML / --set value against a Config field's type; ints are fine where floats are."""
    origin = typing.get_origin(annotation)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (float, int, str, bool):
        if type(value) is not annotation:
            raise UserError(f"{key}: expected {annotation.__name__}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(annotation) or (Any,)
        return origin(_coerce(v, inner, key) for v in value) if inner is not Any else origin(value)
    if origin is typing.Literal:
        if value not in typing.get_args(annotation):
            raise UserError(f"{key}: expected one of {typing.get_args(annotation)}, got {value!r}")
        return value
    return value


def resolve_config(name: str, preset: str | None, overrides: dict[str, Any], where: str = "method") -> tuple[str, Any]:
    """Config defaults <- preset <- recipe overrides, validated. Returns (preset, Config instance).

    ``where`` is the recipe section the values came from, for error messages."""
    cls = get_method_class(name)
    preset = preset or cls.default_preset
    presets = {"default": {}, **cls.presets}
    if preset not in presets:
        raise UserError(f"{where}.preset: method {name!r} has no preset {preset!r}; choose one of {', '.join(presets)}")
    hints = typing.get_type_hints(cls.Config)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    values: dict[str, Any] = {}
    for key, value in {**presets[preset], **overrides}.items():
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise UserError(f"{where}.{key}: unknown hyper-parameter of {name!r} ({did_you_mean(key, sorted(fields))}it has: {known})")
        values[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        cfg = cls.Config(**values)
    except ValueError as err:  # a Config's __post_init__ rejecting an impossible value
        raise UserError(f"{where}: {err}") from None
    return preset, cfg


def build_method(name: str, cfg: Any, student: FeatureSpec, teacher: FeatureSpec) -> Method:
    return get_method_class(name)(cfg, student, teacher)


def method_for(name: str, cfg: Any, student: Any, teacher: Any | None, num_classes: int) -> Method:
    """The method built for this pair of models; a method without a teacher sees the student's
    features twice."""
    s_spec = FeatureSpec.of(student, num_classes)
    t_spec = FeatureSpec.of(teacher, num_classes) if teacher is not None else s_spec
    return build_method(name, cfg, s_spec, t_spec)


__all__ = ["FeatureSpec", "Method", "build_method", "get_method_class", "method_for", "registry", "resolve_config"]
