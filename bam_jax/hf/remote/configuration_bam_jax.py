"""The Hugging Face configuration of an exported bam_jax model.

`bam_jax` is the model's bam_jax ModelConfig as a plain dict (ModelConfig.to_dict(): moe, moa and
lory are nested dicts or None); modeling_bam_jax.py builds the model from it alone. The standard
keys (vocab_size, hidden_size, ...) repeat it for the tools that read them and are derived from it
whenever it is given.

This file is copied into the export directory next to the weights: it imports transformers only.
"""

from transformers import PretrainedConfig


class BamJaxConfig(PretrainedConfig):
    """bam_jax: ModelConfig.to_dict(). Other keyword arguments (bos_token_id, eos_token_id,
    pad_token_id, max_position_embeddings, ...) are kept as given."""

    model_type = 'bam_jax'
    keys_to_ignore_at_inference = ['cache', 'past_key_values']

    def __init__(self, bam_jax=None, max_position_embeddings=2048, use_cache=True, **kwargs):
        self.bam_jax = dict(bam_jax or {})
        self.max_position_embeddings = max_position_embeddings
        self.use_cache = use_cache
        model = self.bam_jax
        if model:
            heads = model['num_heads']
            kwargs.update(vocab_size=model['vocab_size'], hidden_size=model['d_model'],
                          num_hidden_layers=model['num_layers'], num_attention_heads=heads,
                          num_key_value_heads=model['num_kv_heads'],
                          head_dim=model.get('head_dim') or model['d_model'] // heads,
                          intermediate_size=model['d_ff'], rms_norm_eps=model['norm_eps'],
                          tie_word_embeddings=bool(model['tie_embeddings']))
        # Passed on rather than set here: older transformers' __init__ would reset it to True.
        kwargs.setdefault('tie_word_embeddings', False)
        super().__init__(**kwargs)
