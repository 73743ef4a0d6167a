"""Training: state, step, loop, optimiser, sharding rules, checkpoints, metrics."""

from mmjax.train.optimizer import decay_mask, learning_rate_schedule, make_optimizer

__all__ = ["decay_mask", "learning_rate_schedule", "make_optimizer"]
