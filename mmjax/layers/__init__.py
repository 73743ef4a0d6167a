"""Flax linen modules: thin shells that own parameters and call :mod:`mmjax.ops`."""
