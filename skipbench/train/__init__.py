"""Train LayerSkip checkpoints offline (arXiv 2404.16710), so the early-exit self-speculative decoder has a
draft worth accepting without downloading Meta's checkpoints.

data: corpus, tokenizer and token chunks; recipe: layer dropout and the early-exit loss; loop: the run.
"""

from skipbench.train.data import TrainError
from skipbench.train.loop import TrainConfig, TrainResult, config_from, train

__all__ = ["TrainConfig", "TrainError", "TrainResult", "config_from", "train"]
