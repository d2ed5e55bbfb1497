"""Imitation finetuning: ``train.run(config, workdir)``, its config and its error type.

>>> from imitax import train
>>> config = train.default_config()          # or configs/finetune.py's get_config()
>>> config.init_from, config.data.train = "hf_dir", "sharegpt.json"
>>> train.check(config)                      # train.ConfigError naming the field, before anything loads
>>> train.run(config, "/tmp/run")            # train.TrainingError on bad input or divergence
"""

from imitax.train.config import ConfigError, check, default_config, study_config
from imitax.train.loop import TrainingError, run

__all__ = ["ConfigError", "TrainingError", "check", "default_config", "run", "study_config"]
