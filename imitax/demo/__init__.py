"""The one-command demo: a synthetic world of facts in which the imitation study runs in miniature.

* :mod:`~imitax.demo.world`: the world generator (pretraining corpus, fact benchmarks, the
  teacher's imitation data and style references, a tokenizer), deterministic from a seed.
"""
