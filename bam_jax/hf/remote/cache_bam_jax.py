"""The decoding cache of an exported bam_jax model: transformers' DynamicCache, plus each Lory
layer's merged FFN per row, moved with the keys and values whenever generate() reorders, repeats
or selects rows (beam search and its relatives).

This file is copied into the export directory next to the weights: it imports torch and
transformers only. Shapes: B batch, D d_model, F d_ff.
"""

import torch
from transformers.cache_utils import DynamicCache


class BamJaxCache(DynamicCache):
    """A DynamicCache that also holds each Lory layer's merged FFN, one per row.

    lory: {layer: (wi_gate [B, 1, D, F], wi_up [B, 1, D, F], wo [B, 1, F, D])}, the experts averaged
    by the router's softmax over the row's prompt. Its batch axis is the keys' and values': every
    method transformers uses to reorder, repeat or select rows (beam search and its relatives)
    applies to both, so a row keeps its own merge. Constructed as DynamicCache is.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lory = {}

    def _rows(self, take):
        """Replaces every merged weight w by take(w), a new batch axis of the same rows."""
        self.lory = {layer: tuple(take(w) for w in merged) for layer, merged in self.lory.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor):
        """Row i becomes row beam_idx[i] [B'] (beam search's reordering after each step)."""
        super().reorder_cache(beam_idx)
        self._rows(lambda w: w.index_select(0, beam_idx.to(w.device)))

    def batch_repeat_interleave(self, repeats: int):
        """Every row repeated `repeats` times in place: [B] -> [B * repeats]."""
        super().batch_repeat_interleave(repeats)
        self._rows(lambda w: w.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        """Only the rows `indices` [B'] kept, in that order."""
        super().batch_select_indices(indices)
        self._rows(lambda w: w[indices])

    def reset(self):
        """Empty again: the next call is a prefill, which merges anew."""
        super().reset()
        self.lory = {}
