"""A TFDS builder for a local folder of images with captions (for fine-tuning on your own pictures).

Captions come from `metadata.jsonl` (Hugging Face imagefolder convention: one {"file_name": ..., "text": ...}
per line, file names relative to the metadata file) or from `name.txt` beside `name.png` / `name.jpg`.
Sub-folders `train/`, `validation/`, `test/` become splits; otherwise the whole folder is "train".

    builder = CaptionedImageFolder(folder="/data/my_pictures", data_dir="/tmp/tfds")
    builder.download_and_prepare()

Image bytes are stored as they are, not decoded: a corrupt file is found (and skipped, and counted) by the
input pipeline instead of failing the build.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import warnings

import tensorflow_datasets as tfds
from etils import epath

# What tf.io.decode_image reads.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
SPLIT_FOLDERS = ("train", "validation", "test")
METADATA_FILE = "metadata.jsonl"


class ImageFolderError(ValueError):
    """A folder that cannot be turned into a captioned image dataset."""


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _list_images(root: str) -> list[str]:
    """Image paths under `root` relative to it, sorted (so example order does not depend on the filesystem)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.relpath(os.path.join(folder, f), root) for f in files if _is_image(f)]
    return sorted(found)


def _read_metadata(root: str) -> dict[str, str]:
    captions = {}
    path = os.path.join(root, METADATA_FILE)
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[os.path.normpath(row["file_name"])] = str(row["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ImageFolderError(
                    f'{path}:{line_number}: expected a JSON object with "file_name" and "text", got {line.strip()!r}'
                ) from e
    return captions


def _sidecar_caption(root: str, image: str) -> str | None:
    path = os.path.join(root, os.path.splitext(image)[0] + ".txt")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def captioned_images(root: str) -> list[tuple[str, str]]:
    """(relative image path, caption) pairs of one split folder, sorted by path.

    Images without a caption are left out with a warning; a folder without images or without any
    caption raises `ImageFolderError`.
    """
    images = _list_images(root)
    if not images:
        raise ImageFolderError(f"no images in {root!r}; accepted extensions: {', '.join(IMAGE_EXTENSIONS)}")
    has_metadata = os.path.isfile(os.path.join(root, METADATA_FILE))
    metadata = _read_metadata(root) if has_metadata else {}
    pairs, missing = [], []
    for image in images:
        text = metadata.get(os.path.normpath(image)) if has_metadata else _sidecar_caption(root, image)
        (missing.append(image) if text is None else pairs.append((image, text)))
    if not pairs:
        raise ImageFolderError(
            f"no captions for the {len(images)} images in {root!r}; give each image a caption in "
            f'{METADATA_FILE} (lines {{"file_name": "a.png", "text": "..."}}) or in a.txt beside a.png'
        )
    if missing:
        warnings.warn(
            f"{len(missing)} images in {root!r} have no caption and are left out, e.g. {missing[0]!r}", stacklevel=3
        )
    return pairs


def find_splits(folder: str) -> dict[str, str]:
    """Split name -> directory: the train/validation/test sub-folders if any, else {"train": folder}."""
    if not os.path.isdir(folder):
        raise ImageFolderError(f"image folder {folder!r} does not exist or is not a directory")
    splits = {s: os.path.join(folder, s) for s in SPLIT_FOLDERS if os.path.isdir(os.path.join(folder, s))}
    return splits or {"train": folder}


def _is_dataset_file(name: str) -> bool:
    return _is_image(name) or name.endswith(".txt") or name == METADATA_FILE


def _fingerprint(folder: str) -> str:
    # Names, sizes and mtimes of the images and captions: a changed folder gets a new config, hence a fresh
    # build; other files (e.g. a TFDS data_dir inside the folder) do not count.
    digest = hashlib.sha256(os.path.abspath(folder).encode())
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(filter(_is_dataset_file, files)):
            path = os.path.join(root, name)
            stat = os.stat(path)
            digest.update(f"{os.path.relpath(path, folder)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
    """The folder to read; one config (and data directory) per folder path and content."""

    folder: str = ""


def make_config(folder: str | os.PathLike) -> ImageFolderConfig:
    """A config named after the folder's base name and a fingerprint of its files."""
    folder = os.path.abspath(os.fspath(folder))
    find_splits(folder)
    base = re.sub(r"[^A-Za-z0-9_]+", "_", os.path.basename(folder.rstrip(os.sep)))[:40] or "folder"
    return ImageFolderConfig(name=f"{base}_{_fingerprint(folder)}", folder=folder)


class CaptionedImageFolder(tfds.core.GeneratorBasedBuilder):
    """Images + captions from a local folder; features: image (encoded as found), caption, file_name."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # TFDS derives this through `importlib_resources`, absent on Python >= 3.9 installs; same value.
    code_path = epath.Path(__file__)

    def __init__(self, *, folder: str | os.PathLike | None = None, file_format: str = "array_record", **kwargs):
        """`folder=` (or `config=make_config(folder)`) picks the images; files default to array_record
        so the input pipeline can read examples by index."""
        if folder is not None:
            if kwargs.get("config") is not None:
                raise ImageFolderError("pass either folder= or config=, not both")
            kwargs["config"] = make_config(folder)
        if kwargs.get("config") is None:
            raise ImageFolderError("CaptionedImageFolder needs folder=<path to a folder of captioned images>")
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "caption": tfds.features.Text(),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Local files only.
        return {split: self._generate_examples(root) for split, root in find_splits(self.builder_config.folder).items()}

    def _generate_examples(self, root: str):
        for file_name, text in captioned_images(root):
            # A path: TFDS stores the file's bytes untouched.
            image = epath.Path(os.path.join(root, file_name))
            yield file_name, {"image": image, "caption": text, "file_name": file_name}
