"""Evaluation: generation (and, alongside it, scoring, tasks and metrics)."""

from imitax.eval.generate import generate, sample_logits, top_k_filter, top_p_filter

__all__ = ["generate", "sample_logits", "top_k_filter", "top_p_filter"]
