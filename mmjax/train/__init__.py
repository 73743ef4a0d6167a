"""Training: optimiser (and, later, train state, step, loop, sharding, checkpointing)."""

from mmjax.train.optimizer import decay_mask, learning_rate_schedule, make_optimizer

__all__ = ["decay_mask", "learning_rate_schedule", "make_optimizer"]
