"""The shapes64 TFDS builder: `scene.example` rendered for each index of a train and a validation split.

Generated locally and deterministically from a seed (no download). Each (num_train, num_validation, seed)
is its own TFDS config, so differently sized datasets never share a directory:

    builder = Shapes64(data_dir="/tmp/tfds", num_train=200, num_validation=50)
    builder.download_and_prepare()
    ds = builder.as_dataset(split="train")
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

import sdjax.data  # noqa: F401  (hides accelerators from TensorFlow before it uses any)
from sdjax.shapes64.scene import COLORS, IMAGE_SIZE, SHAPES, SceneError, example


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


@dataclasses.dataclass(eq=False)
class Shapes64Config(tfds.core.BuilderConfig):
    """Split sizes and seed; each distinct combination is its own TFDS config (and data directory)."""

    num_train: int = 50_000
    num_validation: int = 2_000
    seed: int = 0


def _config_name(num_train: int, num_validation: int, seed: int) -> str:
    return f"train{num_train}_val{num_validation}_seed{seed}"


DEFAULT_CONFIG = Shapes64Config(name=_config_name(50_000, 2_000, 0), description="50k train, 2k validation")


class Shapes64(tfds.core.GeneratorBasedBuilder):
    """64x64 single-shape images with captions "a {color} {shape} on a {background} background".

    TFDS registers it as "shapes64" (from the class name): renaming the class would orphan prepared data.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [DEFAULT_CONFIG]
    # TFDS derives this through `importlib_resources`, absent on Python >= 3.9 installs; same value.
    code_path = epath.Path(__file__)

    def __init__(
        self,
        *,
        num_train: int | None = None,
        num_validation: int | None = None,
        seed: int | None = None,
        file_format: str = "array_record",
        **kwargs,
    ):
        """Builder kwargs `num_train`, `num_validation`, `seed` make a config; or pass `config=`.

        Files default to array_record so the input pipeline can read examples by index.
        """
        if any(v is not None for v in (num_train, num_validation, seed)):
            if kwargs.get("config") is not None:
                raise SceneError("pass either config= or num_train/num_validation/seed, not both")
            kwargs["config"] = make_config(
                num_train=DEFAULT_CONFIG.num_train if num_train is None else num_train,
                num_validation=DEFAULT_CONFIG.num_validation if num_validation is None else num_validation,
                seed=DEFAULT_CONFIG.seed if seed is None else seed,
            )
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"),
                    "caption": tfds.features.Text(),
                    "color": tfds.features.ClassLabel(names=COLORS),
                    "shape": tfds.features.ClassLabel(names=SHAPES),
                    "background": tfds.features.ClassLabel(names=COLORS),
                }
            ),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        config = self.builder_config
        return {
            "train": self._generate_examples("train", config.num_train),
            "validation": self._generate_examples("validation", config.num_validation),
        }

    def _generate_examples(self, split: str, num_examples: int):
        seed = self.builder_config.seed
        for index in range(num_examples):
            ex = example(seed, split, index)
            yield index, {**ex, "image": _png(ex["image"])}


def make_config(num_train: int = 50_000, num_validation: int = 2_000, seed: int = 0) -> Shapes64Config:
    """A `Shapes64Config` named after its sizes and seed (so different sizes never share a directory)."""
    if num_train < 1 or num_validation < 1:
        raise SceneError(f"split sizes must be >= 1, got num_train={num_train}, num_validation={num_validation}")
    return Shapes64Config(
        name=_config_name(num_train, num_validation, seed),
        num_train=num_train,
        num_validation=num_validation,
        seed=seed,
    )
