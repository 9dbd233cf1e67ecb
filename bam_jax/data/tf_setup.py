"""Keep TensorFlow on the host: the data pipeline must not take accelerator
memory that JAX needs. Imported first by the data package, before seqio."""

import tensorflow as tf


def hide_accelerators_from_tensorflow():
    """Make GPUs and TPUs invisible to TensorFlow (a no-op once TF's runtime
    has started, which then keeps whatever it already chose)."""
    for kind in ('GPU', 'TPU'):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError):
            # RuntimeError: runtime already initialised; ValueError: no such
            # device type on this build.
            pass


hide_accelerators_from_tensorflow()
