"""Training: the spec of one SAE's training (`TrainSpec`), one SAE's trainer (`SAETrainer`) and
the group driver that trains N SAEs on one activation stream (`GroupTrainer`)."""

from saelab.train.group import GroupTrainer, TrainConfig, rank_and_world
from saelab.train.spec import TrainSpec
from saelab.train.trainer import SAETrainer

__all__ = ["GroupTrainer", "SAETrainer", "TrainConfig", "TrainSpec", "rank_and_world"]
