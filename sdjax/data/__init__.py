"""Data: `sources` (a named source, an image folder or a TFDS name -> a TFDS builder), the image-folder builder
and the tf.data `input_pipeline`.

TensorFlow is only a data loader here: accelerators are hidden from it before anything else imports it, so
it never reserves GPU/TPU memory that JAX needs.
"""

import tensorflow as tf

for _device_type in ("GPU", "TPU"):
    try:
        tf.config.set_visible_devices([], _device_type)
    except (RuntimeError, ValueError):
        # RuntimeError: TF already initialised its devices (too late to hide them, nothing to do).
        # ValueError: this TF build does not know the device type.
        pass
