"""The one-command demo: a synthetic world of facts in which the imitation study runs in miniature.

* :mod:`~imitax.demo.world`: the world generator (pretraining corpus, fact benchmarks, the
  teacher's imitation data and style references, a tokenizer), deterministic from a seed.
* :mod:`~imitax.demo.recipe`: the pretraining, finetuning and evaluation settings that the demo's
  sweep configs (``configs/demo.py``, ``configs/demo_distill.py``) share.
"""
