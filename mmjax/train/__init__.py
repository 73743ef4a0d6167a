"""Training: state, step, loop, optimiser, sharding, metrics."""
