"""Pallas kernels for masked kernel-regression retrieval (installed as ``mmjax.kernels``)."""
