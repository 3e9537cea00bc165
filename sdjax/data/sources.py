"""Data sources: the one place that turns a source into a TFDS builder.

A source is one of
- a named source (`NAMED_SOURCES`, e.g. "shapes64"), made with its own options;
- an existing folder of captioned images (`CaptionedImageFolder`);
- a registered TFDS dataset name ("mnist", "coco_captions/2017");
- a `tfds.core.DatasetBuilder` instance, used as it is.

    builder("shapes64", data_dir="/tmp/tfds", num_train=200)  # 200 train, 20 validation examples
    builder("/data/my_pictures")
    captions("shapes64")  # the 90 captions shapes64 can show; None for sources without a finite set
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable

import tensorflow_datasets as tfds

from sdjax.data.imagefolder import CaptionedImageFolder
from sdjax.shapes64 import scene as shapes64_scene
from sdjax.shapes64.dataset import Shapes64


class DataError(ValueError):
    """Bad pipeline arguments or an unusable dataset."""


class MissingSplitError(DataError):
    """The source has no split of the requested name."""


@dataclasses.dataclass(frozen=True)
class NamedSource:
    """`make(data_dir, **options)` -> builder; `captions()` -> every caption it can show (synthetic sources)."""

    make: Callable[..., tfds.core.DatasetBuilder]
    options: tuple[str, ...]
    captions: Callable[[], list[str]] | None = None


def _shapes64(data_dir: str | None, num_train: int | None = None) -> Shapes64:
    if num_train is None:
        return Shapes64(data_dir=data_dir)
    # A tenth as many validation examples (at least one) as training ones.
    return Shapes64(num_train=num_train, num_validation=max(num_train // 10, 1), data_dir=data_dir)


NAMED_SOURCES: dict[str, NamedSource] = {
    "shapes64": NamedSource(_shapes64, ("num_train",), shapes64_scene.captions),
}


def _named(name: str, data_dir: str | None, options: dict) -> tfds.core.DatasetBuilder:
    named = NAMED_SOURCES[name]
    unknown = sorted(set(options) - set(named.options))
    if unknown:
        raise DataError(f"source {name!r} has no option {', '.join(unknown)}; its options: {', '.join(named.options)}")
    return named.make(data_dir, **options)


def _check_no_options(source, options: dict) -> None:
    # A config made for a named source (e.g. configs/shapes64.py:tiny with data.source pointed at a folder) keeps
    # its options: they mean nothing to other sources, which ignore them, saying so.
    if options:
        warnings.warn(
            f"options {', '.join(sorted(options))} apply only to named sources ({', '.join(NAMED_SOURCES)}); "
            f"ignored for {source!r}",
            stacklevel=3,
        )


def builder(source, data_dir: str | None = None, **options) -> tfds.core.DatasetBuilder:
    """The TFDS builder of `source` (not prepared yet); `data_dir` is where TFDS keeps prepared data.

    `options` configure a named source (shapes64: `num_train`); an option set to None means its default.
    """
    options = {k: v for k, v in options.items() if v is not None}
    if isinstance(source, tfds.core.DatasetBuilder):
        _check_no_options(source.name, options)
        return source
    if not isinstance(source, str | os.PathLike):
        raise DataError(
            f"source must be a named source ({', '.join(NAMED_SOURCES)}), a folder path, a TFDS name or a builder, "
            f"got {source!r}"
        )
    source = os.fspath(source)
    if source in NAMED_SOURCES:
        return _named(source, data_dir, options)
    _check_no_options(source, options)
    if os.path.isdir(source):
        return CaptionedImageFolder(folder=source, data_dir=data_dir)
    try:
        return tfds.builder(source, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(
            f"source {source!r} is not a named source ({', '.join(NAMED_SOURCES)}), an existing folder, "
            "nor a registered TFDS dataset"
        ) from e


def captions(source) -> list[str] | None:
    """Every caption a named synthetic source can show (e.g. to train a tokenizer on); None for any other."""
    named = NAMED_SOURCES.get(os.fspath(source)) if isinstance(source, str | os.PathLike) else None
    return None if named is None or named.captions is None else named.captions()
