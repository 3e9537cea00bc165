"""Data: `sources` (a named source, an image folder or a TFDS name -> a TFDS builder), the image-folder builder
and the tf.data `input_pipeline`.

TensorFlow is only a data loader here: accelerators are hidden from it before anything else imports it, so
it never reserves GPU/TPU memory that JAX needs.
"""

import os
import sys
import tempfile


def _import_tensorflow_quietly():
    """``import tensorflow``, without the lines its C++ libraries write to stderr while they load (the oneDNN
    notice, the CPU feature guard, absl's "before InitializeLog" warning, each of them twice; on GPU hosts the
    cuDNN/cuFFT/cuBLAS factory registrations): no setting quiets them that early. They go to file descriptor 2,
    which points at a temporary file during the import; what it caught is shown only if the import fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            import tensorflow
        except BaseException:
            os.dup2(saved, 2)
            caught.seek(0)
            sys.stderr.write(caught.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return tensorflow


try:
    tf = _import_tensorflow_quietly()
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
