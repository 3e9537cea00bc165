"""Data: `sources` (a named source, an image folder or a TFDS name -> a TFDS builder), the image-folder builder
and the tf.data `input_pipeline`.

TensorFlow is only a data loader here: accelerators are hidden from it before anything else imports it, so
it never reserves GPU/TPU memory that JAX needs.
"""

try:
    import tensorflow as tf
except ModuleNotFoundError as e:  # sampling needs no TensorFlow, so it is an extra
    raise ModuleNotFoundError(
        f"sdjax's training data pipeline needs TensorFlow ({e.name} is not installed): pip install -e '.[train]'",
        name=e.name,
    ) from None

for _device_type in ("GPU", "TPU"):
    try:
        tf.config.set_visible_devices([], _device_type)
    except (RuntimeError, ValueError):
        # RuntimeError: TF already initialised its devices (too late to hide them, nothing to do).
        # ValueError: this TF build does not know the device type.
        pass
