"""Load ``configs/NAME.py[:preset]`` the way ``--config`` does (test helper)."""

import importlib.util
import pathlib

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def load_config(spec: str):
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(f"config_{path[:-3]}", CONFIGS / path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)
