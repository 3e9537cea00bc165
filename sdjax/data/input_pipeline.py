"""The tf.data input pipeline: TFDS split -> decoded, augmented, tokenized batches for pmap.

Order and randomness are functions of (seed, position) only, which makes the stream resumable:

- position p counts examples of the infinite stream; step k owns positions [k*G, (k+1)*G) for the global
  batch G, and host h takes its contiguous slice of them;
- epoch e = p // N shows example `index_shuffle(p % N, seed, e)`: a fresh permutation per epoch, computed
  per element, so starting at step k costs nothing (no replay of a shuffle buffer, no decoding);
- crop, flip and caption dropout draw from stateless RNGs seeded with (seed, p).

Images are read by index (TFDS array_record data sources) and decoded by TensorFlow. An undecodable image
is skipped and counted; its slot in the batch is filled by another image of the same batch, so batch k
always comes from positions of step k and resuming stays exact.
"""

from __future__ import annotations

import atexit
import dataclasses
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from sdjax.data import sources
from sdjax.data.sources import DataError
from sdjax.tokenizer import MAX_LENGTH, tokenize

_AUTOTUNE = tf.data.AUTOTUNE
# More than this fraction of undecodable images (after the first few batches) means a broken dataset or
# wrong image_key, not a few bad files: stop instead of training on filler.
_MAX_CORRUPT_FRACTION = 0.5


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """How one global batch is split over hosts and their local devices."""

    num_devices: int
    per_device_batch: int
    process_index: int
    process_count: int

    @property
    def host_batch(self) -> int:
        return self.num_devices * self.per_device_batch

    @property
    def global_batch(self) -> int:
        return self.host_batch * self.process_count


def batch_layout(
    global_batch_size: int | None = None,
    per_device_batch: int | None = None,
    num_devices: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> BatchLayout:
    """Resolves exactly one of global_batch_size / per_device_batch against local devices and hosts.

    num_devices is the number of *local* devices (default `jax.local_device_count()`); hosts default to
    `jax.process_index()` / `jax.process_count()`.
    """
    num_devices = jax.local_device_count() if num_devices is None else num_devices
    process_count = jax.process_count() if process_count is None else process_count
    process_index = jax.process_index() if process_index is None else process_index
    if num_devices < 1 or process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(
            f"invalid layout num_devices={num_devices}, process_index={process_index}, "
            f"process_count={process_count}; need num_devices >= 1 and 0 <= process_index < process_count"
        )
    if (global_batch_size is None) == (per_device_batch is None):
        raise DataError("pass exactly one of global_batch_size and per_device_batch")
    if global_batch_size is not None:
        devices = num_devices * process_count
        if global_batch_size < 1 or global_batch_size % devices:
            raise DataError(
                f"global_batch_size={global_batch_size} must be a positive multiple of the {devices} devices "
                f"({process_count} hosts x {num_devices} local devices)"
            )
        per_device_batch = global_batch_size // devices
    if per_device_batch < 1:
        raise DataError(f"per_device_batch must be >= 1, got {per_device_batch}")
    return BatchLayout(num_devices, per_device_batch, process_index, process_count)


# ---------------------------------------------------------------------------------------------------------
# Sources: random access to the encoded examples of one split.


@dataclasses.dataclass(frozen=True)
class ExampleSource:
    """`read(indices)` -> (encoded image bytes, caption bytes), both object arrays shaped like indices."""

    name: str
    num_examples: int
    read: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _check_features(builder: tfds.core.DatasetBuilder, image_key: str, caption_key: str | None) -> None:
    features = dict(builder.info.features.items())
    if not isinstance(features.get(image_key), tfds.features.Image):
        raise DataError(f"{builder.name} has no image feature {image_key!r}; its features: {list(features)}")
    if caption_key is not None and not isinstance(features.get(caption_key), tfds.features.Text):
        raise DataError(
            f"{builder.name} has no text feature {caption_key!r}; its features: {list(features)} "
            "(caption_key=None trains without captions)"
        )


def _as_bytes(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _random_access_reader(builder, split, image_key, caption_key):
    data = builder.as_data_source(split, decoders={image_key: tfds.decode.SkipDecoding()})

    def read(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = data.__getitems__([int(i) for i in indices])
        images = np.array([_as_bytes(r[image_key]) for r in rows], dtype=object)
        captions = np.array([_as_bytes(r[caption_key]) if caption_key else b"" for r in rows], dtype=object)
        return images, captions

    return len(data), read


def _in_memory_reader(builder, split, image_key, caption_key):
    warnings.warn(
        f"{builder.name} is stored as {builder.info.file_format}, which cannot be read by index: loading the "
        f"encoded {split!r} split into memory (re-prepare it with file_format='array_record' if too large)",
        stacklevel=3,
    )
    ds = builder.as_dataset(split, decoders={image_key: tfds.decode.SkipDecoding()}, shuffle_files=False)
    rows = list(ds.as_numpy_iterator())
    images = np.array([r[image_key] for r in rows], dtype=object)
    captions = np.array([r[caption_key] if caption_key else b"" for r in rows], dtype=object)
    return len(rows), lambda indices: (images[indices], captions[indices])


def open_source(
    source,
    split: str,
    data_dir: str | None = None,
    image_key: str = "image",
    caption_key: str | None = "caption",
    source_options: dict | None = None,
) -> ExampleSource:
    """Prepares (if needed) and opens one split of a source (see `sources.builder`, given `source_options`)."""
    builder = sources.builder(source, data_dir, **(source_options or {}))
    sources.prepare(builder)
    if split not in builder.info.splits:
        raise sources.MissingSplitError(
            f"{builder.name} has no split {split!r}; its splits: {list(builder.info.splits)}"
        )
    _check_features(builder, image_key, caption_key)
    random_access = builder.info.file_format in tfds.core.file_adapters.FileFormat.with_random_access()
    reader = _random_access_reader if random_access else _in_memory_reader
    num_examples, read = reader(builder, split, image_key, caption_key)
    if num_examples < 1:
        raise DataError(f"split {split!r} of {builder.name} is empty")
    return ExampleSource(builder.name, num_examples, read)


# ---------------------------------------------------------------------------------------------------------
# Order: position -> example index, and per-example preprocessing.


def example_index(position: tf.Tensor, num_examples: int, seed: int) -> tf.Tensor:
    """Example shown at stream `position` (int64 scalar): a seeded permutation of [0, N) per epoch."""
    epoch = position // num_examples
    # Negative second seed word: never equal to an augmentation seed (seed, position >= 0).
    shuffle_seed = tf.stack([tf.constant(seed, tf.int64), -1 - epoch])
    return tf.random.experimental.index_shuffle(position % num_examples, shuffle_seed, num_examples - 1)


def example_indices(positions: np.ndarray, num_examples: int, seed: int) -> np.ndarray:
    """`example_index` for an array of positions (int64), e.g. to know which examples batch k holds."""
    return np.array([int(example_index(tf.constant(int(p), tf.int64), num_examples, seed)) for p in positions])


def resize_and_crop(
    image: tf.Tensor, resolution: int, crop_seed: tf.Tensor | None
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """uint8 (H, W, 3) -> float32 (resolution, resolution, 3) in [0, 255]: shorter side to `resolution`
    (bilinear, antialiased), then a centre crop, or a random one when `crop_seed` is given. Also returns the
    crop's top-left corner (top, left) in the resized image and the resized (height, width), both int32 (2,)."""
    size = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = resolution / tf.reduce_min(size)
    new_size = tf.maximum(tf.cast(tf.round(size * scale), tf.int32), resolution)
    image = tf.image.resize(image, new_size, method="bilinear", antialias=True)
    slack = new_size - resolution
    if crop_seed is None:
        offset = tf.cast(tf.round(tf.cast(slack, tf.float32) / 2), tf.int32)
    else:
        offset = tf.random.stateless_uniform([2], crop_seed, maxval=tf.int32.max, dtype=tf.int32) % (slack + 1)
    return image[offset[0] : offset[0] + resolution, offset[1] : offset[1] + resolution], offset, new_size


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Output resolution and the per-example random augmentations (all seeded by (seed, position))."""

    resolution: int
    random_crop: bool
    random_flip: bool
    caption_dropout: float
    seed: int


def preprocess(position: tf.Tensor, image_bytes: tf.Tensor, caption: tf.Tensor, aug: Augmentation):
    """Decodes and augments one example: -> {"image": float32 (R, R, 3) in [-1, 1], "caption": the (maybe
    dropped) caption, "original_size": int32 (h, w) of the decoded image, "crop_top_left": int32 (top, left)}.

    The crop corner is SDXL's micro-conditioning (Podell et al. 2023, Sec. 2.2), recorded as diffusers'
    train_text_to_image_sdxl.py does: in the resized image, after the horizontal flip (which that script
    applies before cropping), so a flipped example's left is measured from the flipped image's left edge."""
    crop_seed, flip_seed, dropout_seed = tf.unstack(
        tf.random.experimental.stateless_split(tf.stack([tf.constant(aug.seed, tf.int64), position]), 3)
    )
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    original_size = tf.shape(image)[:2]
    image, top_left, resized = resize_and_crop(image, aug.resolution, crop_seed if aug.random_crop else None)
    if aug.random_flip:
        flip = tf.random.stateless_uniform([], flip_seed) < 0.5
        image = tf.cond(flip, lambda: image[:, ::-1], lambda: image)
        flipped_left = resized[1] - aug.resolution - top_left[1]
        top_left = tf.where(flip, tf.stack([top_left[0], flipped_left]), top_left)
    image.set_shape([aug.resolution, aug.resolution, 3])
    if aug.caption_dropout > 0:
        drop = tf.random.stateless_uniform([], dropout_seed) < aug.caption_dropout
        caption = tf.where(drop, tf.constant(b""), caption)
    return {"image": image / 127.5 - 1.0, "caption": caption, "original_size": original_size, "crop_top_left": top_left}


def _decode_batch(positions, images, captions, aug: Augmentation, host_batch: int):
    """One host batch: decoded examples, undecodable ones replaced by others of the same batch."""
    decoded = (
        tf.data.Dataset.from_tensor_slices((positions, images, captions))
        .map(lambda p, i, c: preprocess(p, i, c, aug), num_parallel_calls=_AUTOTUNE, deterministic=True)
        .ignore_errors()
        .batch(host_batch)
    )
    # Guarantees exactly one element even when every image of the batch is undecodable.
    empty = {
        "image": tf.zeros([0, aug.resolution, aug.resolution, 3]),
        "caption": tf.zeros([0], tf.string),
        "original_size": tf.zeros([0, 2], tf.int32),
        "crop_top_left": tf.zeros([0, 2], tf.int32),
    }
    return decoded.concatenate(tf.data.Dataset.from_tensors(empty)).take(1).map(lambda b: _fill(b, host_batch))


def _fill(batch: dict, host_batch: int) -> dict:
    num_valid = tf.shape(batch["image"])[0]
    take = tf.range(host_batch) % tf.maximum(num_valid, 1)

    def filled(x):
        blank = tf.fill([host_batch], "") if x.dtype == tf.string else tf.zeros([host_batch, *x.shape[1:]], x.dtype)
        return tf.cond(num_valid > 0, lambda: tf.gather(x, take), lambda: blank)

    return {**{k: filled(x) for k, x in batch.items()}, "num_valid": num_valid}


def _tokenize_fn(tokenizer):
    # The Rust tokenizer keeps padding/truncation settings as mutable state: one call at a time.
    lock = threading.Lock()

    def run(captions: np.ndarray) -> np.ndarray:
        with lock:
            return tokenize(tokenizer, [c.decode("utf-8", "replace") for c in captions], MAX_LENGTH)

    return run


def build_dataset(
    source: ExampleSource,
    layout: BatchLayout,
    aug: Augmentation,
    tokenizer,
    start_step: int,
    tokenizer_2=None,
    record_sizes: bool = False,
) -> tf.data.Dataset:
    """The tf.data graph; elements {"image" (D, B, R, R, 3), "input_ids" (D, B, 77), "num_valid" ()}, plus
    "input_ids_2" (D, B, 77) with `tokenizer_2` and "original_size", "crop_top_left" (D, B, 2) with
    `record_sizes`."""
    n, bh = source.num_examples, layout.host_batch

    def host_positions(step):  # this host's contiguous slice of the global batch
        return step * layout.global_batch + layout.process_index * bh + tf.range(bh, dtype=tf.int64)

    def fetch(positions):
        indices = tf.map_fn(lambda p: example_index(p, n, aug.seed), positions)
        # stateful: keeps tf.data from calling the reader from several threads at once.
        images, captions = tf.numpy_function(source.read, [indices], (tf.string, tf.string), stateful=True)
        return positions, tf.ensure_shape(images, [bh]), tf.ensure_shape(captions, [bh])

    def tokenize_batch(batch):
        shape = [layout.num_devices, layout.per_device_batch]
        tokenizers = {"input_ids": tokenizer, "input_ids_2": tokenizer_2}
        ids = {
            key: tf.numpy_function(_tokenize_fn(tok), [batch["caption"]], tf.int32, stateful=False)
            for key, tok in tokenizers.items()
            if tok is not None
        }
        out = {key: tf.reshape(x, [*shape, MAX_LENGTH]) for key, x in ids.items()}
        out["image"] = tf.reshape(batch["image"], [*shape, aug.resolution, aug.resolution, 3])
        if record_sizes:
            out.update({k: tf.reshape(batch[k], [*shape, 2]) for k in ("original_size", "crop_top_left")})
        return {**out, "num_valid": batch["num_valid"]}

    ds = tf.data.Dataset.range(start_step, tf.int64.max).map(host_positions).map(fetch)
    ds = ds.interleave(
        lambda p, i, c: _decode_batch(p, i, c, aug, bh),
        cycle_length=2,
        num_parallel_calls=_AUTOTUNE,
        deterministic=True,
    )
    ds = ds.map(tokenize_batch).prefetch(2)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


class InputPipeline(Iterator[dict[str, np.ndarray]]):
    """Infinite iterator of numpy batches; `step` is the index of the next batch.

    `num_corrupt_skipped` counts this host's undecodable images since `start_step`. Use it as a context
    manager or call `close()` to stop the background threads early.
    """

    def __init__(self, dataset: tf.data.Dataset, layout: BatchLayout, start_step: int, num_examples: int):
        self.layout, self.step, self.num_examples = layout, start_step, num_examples
        self.num_corrupt_skipped = 0
        self._seen = 0
        self._batches = dataset.as_numpy_iterator()
        _OPEN_PIPELINES.add(self)

    def __next__(self) -> dict[str, np.ndarray]:
        if self._batches is None:
            raise StopIteration
        batch = next(self._batches)
        num_valid = int(batch.pop("num_valid"))
        self._record(num_valid)
        self.step += 1
        return batch

    def _record(self, num_valid: int) -> None:
        bh = self.layout.host_batch
        self.num_corrupt_skipped += bh - num_valid
        self._seen += bh
        if num_valid == 0:
            warnings.warn(f"every image of batch {self.step} is undecodable; it was filled with zeros", stacklevel=3)
        if self._seen >= 4 * bh and self.num_corrupt_skipped > _MAX_CORRUPT_FRACTION * self._seen:
            raise DataError(
                f"{self.num_corrupt_skipped} of {self._seen} images could not be decoded: the dataset is broken "
                "or image_key does not name encoded images"
            )

    def close(self) -> None:
        """Releases the tf.data iterator (its prefetch threads call back into Python)."""
        self._batches = None
        _OPEN_PIPELINES.discard(self)

    def __enter__(self) -> InputPipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# tf.data threads still running numpy_function callbacks while the interpreter shuts down deadlock the
# exit; closing every live pipeline first avoids it.
_OPEN_PIPELINES: weakref.WeakSet[InputPipeline] = weakref.WeakSet()
atexit.register(lambda: [p.close() for p in list(_OPEN_PIPELINES)])


def make_dataset(
    source,
    *,
    split: str = "train",
    resolution: int,
    tokenizer,
    global_batch_size: int | None = None,
    per_device_batch: int | None = None,
    num_devices: int | None = None,
    seed: int = 0,
    start_step: int = 0,
    random_crop: bool = False,
    random_flip: bool = False,
    caption_dropout: float = 0.0,
    image_key: str = "image",
    caption_key: str | None = "caption",
    data_dir: str | None = None,
    source_options: dict | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    tokenizer_2=None,
    record_sizes: bool = False,
) -> InputPipeline:
    """Infinite, deterministic, resumable training batches.

    Args:
      source: a named source (`sources.NAMED_SOURCES`), a folder of captioned images, a registered TFDS name,
        or a TFDS builder; prepared into `data_dir` on first use.
      source_options: options of a named source, e.g. {"num_train": 200}; None values mean its defaults.
      resolution: output side R; images are resized (shorter side) and cropped to R x R.
      tokenizer: a CLIP tokenizer (see `sdjax.tokenizer.load_tokenizer`).
      global_batch_size | per_device_batch: exactly one; num_devices = local devices (default all).
      seed, start_step: `start_step=k` yields exactly the batches an uninterrupted run yields from step k.
      random_crop, random_flip, caption_dropout: augmentations; dropped captions become "".
      process_index, process_count: this host's shard (default from jax).
      tokenizer_2: a second CLIP tokenizer (SDXL's): the captions' ids by it as "input_ids_2".
      record_sizes: add each example's "original_size" (height, width) before resizing and "crop_top_left"
        (top, left) of its crop in the resized (and flipped) image, int32 pixels: SDXL's micro-conditioning.
    Yields:
      {"image": float32 (D, B, R, R, 3) in [-1, 1], "input_ids": int32 (D, B, 77)} with D local devices
      and B the per-device batch; "input_ids_2" int32 (D, B, 77) and "original_size", "crop_top_left" int32
      (D, B, 2) when asked for.
    """
    if resolution < 1:
        raise DataError(f"resolution must be >= 1, got {resolution}")
    if start_step < 0:
        raise DataError(f"start_step must be >= 0, got {start_step}")
    if not 0.0 <= caption_dropout <= 1.0:
        raise DataError(f"caption_dropout is a probability in [0, 1], got {caption_dropout}")
    layout = batch_layout(global_batch_size, per_device_batch, num_devices, process_index, process_count)
    examples = open_source(source, split, data_dir, image_key, caption_key, source_options)
    aug = Augmentation(resolution, random_crop, random_flip, caption_dropout, seed)
    dataset = build_dataset(examples, layout, aug, tokenizer, start_step, tokenizer_2, record_sizes)
    return InputPipeline(dataset, layout, start_step, examples.num_examples)
