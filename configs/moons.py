"""Three moons: the toy experiment of Memory Mosaics (arXiv 2405.06394, section 5, appendix A).

Command (CPU, about TIME_PLACEHOLDER per net)::

    python -m mmjax.moons --config configs/moons.py:heads=3 --workdir /tmp/moons3
    python -m mmjax.moons --config configs/moons.py:heads=1 --workdir /tmp/moons1

Presets (the arg after ``:``, comma-separated ``key=value``): ``heads=1`` or ``heads=3``
(default 3), ``steps=N`` (training steps), ``seed=N``. Any field can also be overridden with
``--config.train.steps=50`` etc.

Expected result (validation periods [1, 2, 3] = 44.4, 88.9, 133.3 steps, lcm 266.7 steps;
error = mean absolute error of 25 autoregressive predictions, aligned):
RESULTS_PLACEHOLDER
"""

from __future__ import annotations

from mmjax.moons.config import default_config

PRESET_KEYS = ("heads", "steps", "seed")


def parse_preset(arg: str | None) -> dict[str, int]:
    """``"heads=3,steps=10"`` -> ``{"heads": 3, "steps": 10}``."""
    out: dict[str, int] = {}
    if not arg:
        return out
    for item in arg.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in PRESET_KEYS:
            raise ValueError(f"config arg items must be KEY=INT with KEY in {PRESET_KEYS}, "
                             f"got {item!r}")
        try:
            out[key] = int(value)
        except ValueError:
            raise ValueError(f"config arg {key} must be an integer, got {value!r}") from None
    return out


def get_config(arg: str | None = None):
    preset = parse_preset(arg)
    return default_config(num_heads=preset.get("heads", 3), steps=preset.get("steps", 500),
                          seed=preset.get("seed", 100))
