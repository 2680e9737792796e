"""The trainer: one config dataclass, a loop that reads top to bottom, checkpoints, evaluation.

    from symmpo_fast.train import TrainConfig, train
    train(TrainConfig(model="tiny", data="synthetic", output_dir="runs/x", max_steps=10))
"""

from .config import TrainConfig, add_arguments, from_args
from .loop import train

__all__ = ["TrainConfig", "add_arguments", "from_args", "train"]
