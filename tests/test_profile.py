"""``train.profile_steps``: a jax.profiler trace of chosen steps, in the workdir."""

import gzip
import json

import jax
import numpy as np
import pytest
from test_train import small_config

from mmjax.config import validate_config, with_defaults
from mmjax.train import profile
from mmjax.train.loop import train_and_evaluate


def test_profile_steps_are_parsed_or_refused_in_one_line():
    assert profile.parse_profile_steps("") is None
    assert profile.parse_profile_steps("3,2") == (3, 2)
    for bad in ("3", "0,2", "2,0", "a,b", "1,2,3"):
        with pytest.raises(ValueError, match="train.profile_steps"):
            profile.parse_profile_steps(bad)
    config = small_config(num_steps=4)
    config.train.profile_steps = "0,1"
    with pytest.raises(ValueError, match="train.profile_steps='0,1': must be"):
        validate_config(with_defaults(config))
    with pytest.raises(ValueError, match="needs --workdir"):
        profile.StepProfiler(None, "1,1")


def test_only_process_0_traces_unless_every_host_is_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert not profile.StepProfiler(tmp_path, "1,1").active
    assert profile.StepProfiler(tmp_path, "1,1", all_hosts=True).active
    assert not profile.StepProfiler(tmp_path, "").active


def test_the_traced_steps_are_in_the_workdir_and_training_is_unchanged(tmp_path):
    config = small_config(num_steps=4)
    plain = train_and_evaluate(config, str(tmp_path / "plain"), progress=False)
    config.train.profile_steps = "2,2"
    traced = train_and_evaluate(config, str(tmp_path / "traced"), progress=False)
    runs = list((tmp_path / "traced" / "tensorboard" / "plugins" / "profile").iterdir())
    assert len(runs) == 1
    assert [p.suffix for p in runs[0].glob("*.xplane.pb")] == [".pb"]
    (trace,) = runs[0].glob("*.trace.json.gz")
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    assert len(events) > 10
    assert not (tmp_path / "plain" / "tensorboard" / "plugins").exists()
    for a, b in zip(jax.tree.leaves(plain["state"].params),
                    jax.tree.leaves(traced["state"].params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_trace_reaches_a_gs_workdir(gcs):
    from mmjax.train import storage

    profiler = profile.StepProfiler(gcs, "1,1")
    profiler.before(1)
    assert profiler.local is not None  # written locally first
    where = profiler.after(1, jax.jit(lambda x: x @ x)(np.ones((64, 64), np.float32)))
    assert where == f"{gcs}/tensorboard/plugins/profile"
    (run,) = storage.listdir(where)
    names = storage.listdir(f"{where}/{run}")
    assert any(n.endswith(".xplane.pb") for n in names), names
    assert profiler.local is None and not profiler.tracing
