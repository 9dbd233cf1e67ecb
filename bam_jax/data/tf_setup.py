"""seqio and TensorFlow, loaded for the vocabularies that need them (SentencePiece, a Hugging Face
tokenizer as a seqio vocabulary, and seqio's byte vocabulary for decoding) with TensorFlow kept on
the host: it must not take accelerator memory that JAX needs. The modules that use them take both
from here (`from bam_jax.data.tf_setup import seqio, tf`), so no import order can skip this."""

import contextlib
import os


@contextlib.contextmanager
def _quiet_stderr():
    """TensorFlow's C++ libraries log banners (CUDA stubs, oneDNN) to fd 2 at
    load time, before any log level applies; hide them during the import."""
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
with _quiet_stderr():
    import seqio  # noqa: F401 - loads tensorflow_text's libraries under the same cover
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
