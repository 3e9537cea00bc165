"""Frozen model configs readable from (and writable to) diffusers / transformers ``config.json`` files."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar


class UnsupportedConfigError(ValueError):
    """A config.json asks for features sdjax does not implement."""


class ConfigTypeError(TypeError, ValueError):
    """A config.json field holds a value of the wrong type (e.g. ``"layers_per_block": "2"``)."""


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


_SCALARS = {"int": int, "float": (int, float), "bool": bool, "str": str}


def _matches(value: Any, annotation: str) -> bool:
    """Whether a config.json value fits a field annotated ``annotation`` (a union of None, int, float, bool,
    str and ``tuple[<annotation>, ...]``, nested to any depth, e.g. ``int | tuple[int | tuple[int, ...], ...]``);
    lists count as tuples, bools are not numbers."""
    for option in (o.strip() for o in _split_top_level(annotation, "|")):
        if option == "None" and value is None:
            return True
        if option.startswith("tuple["):
            element = _split_top_level(option[len("tuple[") : -1], ",")[0].strip()
            if isinstance(value, (list, tuple)) and all(_matches(v, element) for v in value):
                return True
        elif option in _SCALARS and isinstance(value, _SCALARS[option]):
            if not (isinstance(value, bool) and option != "bool"):
                return True
    return False


def _split_top_level(annotation: str, separator: str) -> list[str]:
    """``annotation`` split at ``separator`` outside brackets: "int | tuple[int | None, ...]" at "|" ->
    ["int ", " tuple[int | None, ...]"]."""
    parts, depth, current = [], 0, ""
    for ch in annotation:
        depth += (ch == "[") - (ch == "]")
        if ch == separator and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current]


class ModelConfig:
    """Mixin for ``@dataclasses.dataclass(frozen=True)`` model configs.

    Subclasses declare:
      * ``noop_fields``: fields that config.json files carry and sdjax accepts only at the given value
        (the value that turns the feature off, e.g. ``{"addition_embed_type": None}``);
      * ``class_name``: the diffusers/transformers class written to ``_class_name``/``architectures``.
    Any other field that is neither a dataclass field nor a ``noop_fields`` entry at its no-op value is
    reported by :meth:`from_dict` in one :class:`UnsupportedConfigError`.
    """

    noop_fields: ClassVar[dict[str, Any]] = {}
    ignored_fields: ClassVar[frozenset[str]] = frozenset()
    class_name: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, config: dict[str, Any]):
        """Builds the config from a parsed config.json; raises UnsupportedConfigError naming bad fields."""
        fields = {f.name: f.type for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        names = set(fields)
        kwargs, unsupported = {}, []
        for key, value in config.items():
            if key.startswith("_") or key in cls.ignored_fields:
                continue
            if key in names:
                if isinstance(fields[key], str) and not _matches(value, fields[key]):
                    raise ConfigTypeError(
                        f"{cls.class_name or cls.__name__} config field {key}={value!r} has the wrong type; "
                        f"expected {fields[key]}"
                    )
                kwargs[key] = _freeze(value)
            elif key in cls.noop_fields:
                if _freeze(value) != _freeze(cls.noop_fields[key]):
                    unsupported.append(f"{key}={value!r}")
            else:
                unsupported.append(f"{key}={value!r}")
        if unsupported:
            raise UnsupportedConfigError(
                f"{cls.class_name or cls.__name__} config has fields sdjax does not support: "
                f"{', '.join(unsupported)} (supported: {', '.join(sorted(names))})"
            )
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike):
        """Reads ``config.json`` at ``path``."""
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        """The config as diffusers/transformers would write it (lists, plus the no-op fields)."""
        out = {k: _thaw(v) for k, v in dataclasses.asdict(self).items()}  # type: ignore[call-overload]
        out.update({k: _thaw(v) for k, v in self.noop_fields.items()})
        return out
