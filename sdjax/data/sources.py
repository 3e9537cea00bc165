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

import contextlib
import dataclasses
import io
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import tensorflow_datasets as tfds

from sdjax.data.imagefolder import CaptionedImageFolder, ImageFolderConfig
from sdjax.shapes64 import scene as shapes64_scene
from sdjax.shapes64.dataset import Shapes64, Shapes64Config


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


LOCAL_BUILDERS = (Shapes64, CaptionedImageFolder)  # data drawn or read from local files: nothing downloads


class _LocalBuilderNotes(logging.Filter):
    """TFDS notes that say nothing about sdjax's local builders: their configs are made per data size or folder
    ("Using custom data configuration"), and a data dir they prepare for the first time has no variant yet."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Using custom data configuration: %s":
            return not isinstance(record.args[0], (Shapes64Config, ImageFolderConfig))
        if str(record.msg).startswith("Variant folder %s has no") and record.args:
            return not set(Path(str(record.args[0])).parts) & {b.name for b in LOCAL_BUILDERS}
        return True


logging.getLogger("absl").addFilter(_LocalBuilderNotes())


def prepare(builder: tfds.core.DatasetBuilder) -> None:
    """Prepares ``builder``'s data in its data_dir unless it is already. A local builder (shapes64, an image
    folder) says so in one line instead of TFDS's "Downloading and preparing dataset Unknown size" wording and
    progress bars; other TFDS datasets keep TFDS's own report of what they download."""
    if builder.is_prepared():
        return
    file_format = builder.info.file_format or "array_record"
    if not isinstance(builder, LOCAL_BUILDERS):
        builder.download_and_prepare(file_format=file_format)
        return
    print(f"preparing {builder.name} data in {builder.data_dir} (made locally: nothing is downloaded)",
          file=sys.stderr, flush=True)  # fmt: skip
    tfds.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints its download wording to stdout
            builder.download_and_prepare(file_format=file_format)
    finally:
        tfds.display_progress_bar(True)


def captions(source) -> list[str] | None:
    """Every caption a named synthetic source can show (e.g. to train a tokenizer on); None for any other."""
    named = NAMED_SOURCES.get(os.fspath(source)) if isinstance(source, str | os.PathLike) else None
    return None if named is None or named.captions is None else named.captions()
