"""Evaluation: held-out perplexity per domain and comparison tables across runs."""
