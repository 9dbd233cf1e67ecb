"""TensorFlow preprocessors of the bam tasks."""

from bam_jax.data.tf_setup import tf


def split_into_chunks(dataset, sequence_length, feature='targets'):
    """Split each token sequence into consecutive chunks of at most
    sequence_length[feature] tokens; each chunk becomes an example.

    [n] tokens -> ceil(n / L) examples {feature: [<=L]}, in order, none
    empty. Other features are dropped: a chunk has no single value for them.
    seqio passes `sequence_length` when the task is read.
    """
    length = int(sequence_length[feature])
    if length < 1:
        raise ValueError(f'sequence length must be >= 1, got {length}')

    def chunk(example):
        tokens = example[feature]
        size = tf.size(tokens, out_type=tf.int64)
        count = (size + length - 1) // length
        padded = tf.pad(tokens, [[0, count * length - size]])
        lengths = tf.minimum(
            tf.cast(length, tf.int64),
            size - tf.range(count, dtype=tf.int64) * length)
        return {'rows': tf.reshape(padded, [count, length]),
                'lengths': lengths}

    def trim(row):
        return {feature: row['rows'][:row['lengths']]}

    # Rows of one document unbatch into separate examples, in order.
    return (dataset.map(chunk, num_parallel_calls=tf.data.AUTOTUNE)
            .unbatch()
            .map(trim, num_parallel_calls=tf.data.AUTOTUNE))
