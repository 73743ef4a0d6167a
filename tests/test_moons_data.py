import json

import numpy as np
import pytest

from mmjax.moons import data


def test_explicit_period_lists():
    assert data.VALIDATION_PERIODS == ((1.0, 2.0, 3.0),)
    assert len(data.TRAIN_PERIODS) == 8
    assert (1.0, 2.0, 3.0) not in data.TRAIN_PERIODS
    lcms = [data.period_lcm(p) for p in data.TRAIN_PERIODS + data.VALIDATION_PERIODS]
    assert max(lcms) == pytest.approx(6.0)
    # 800 observations are three periods of the largest lcm
    assert 800 * data.DT == pytest.approx(3 * 6.0)


def test_period_lcm_and_steps():
    assert data.period_lcm([1.0, 2.0, 3.0]) == pytest.approx(6.0)
    assert data.period_lcm([0.5, 1.5]) == pytest.approx(1.5)
    assert data.period_lcm([0.5, 1.0, 2.5]) == pytest.approx(5.0)
    assert data.periods_in_steps([1.0, 2.0, 3.0]) == pytest.approx([44.444, 88.889, 133.333],
                                                                   abs=1e-3)
    with pytest.raises(ValueError, match="multiples of precision"):
        data.period_lcm([0.55, 1.0])
    with pytest.raises(ValueError, match="positive"):
        data.period_lcm([1.0, -2.0])


def test_each_moon_is_periodic_and_the_system_at_the_lcm():
    periods = [1.0, 2.0, 3.0]
    t = np.linspace(0.0, 7.0, 97)
    x = data.moon_positions(t, periods)
    assert x.shape == (97, 6)
    np.testing.assert_allclose(np.linalg.norm(x.reshape(97, 3, 2), axis=-1), 1.0, atol=1e-6)
    for m, p in enumerate(periods):
        shifted = data.moon_positions(t + p, periods)
        np.testing.assert_allclose(shifted[:, 2 * m:2 * m + 2], x[:, 2 * m:2 * m + 2], atol=1e-5)
        # not periodic at a smaller shift
        assert np.abs(data.moon_positions(t + p / 2, periods)[:, 2 * m] - x[:, 2 * m]).max() > 0.5
    np.testing.assert_allclose(data.moon_positions(t + 6.0, periods), x, atol=1e-5)
    assert np.abs(data.moon_positions(t + 3.0, periods) - x).max() > 0.5
    # feature order [sin, cos] with phase 0.3
    np.testing.assert_allclose(data.moon_positions(np.zeros(1), [1.0])[0],
                               [np.sin(0.3), np.cos(0.3)], atol=1e-7)


def test_sample_batch_shapes_shift_and_seed():
    x, y = data.sample_batch(np.random.default_rng(3), data.TRAIN_PERIODS, 4, 50)
    assert x.shape == y.shape == (4, 50, 6) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    x2, _ = data.sample_batch(np.random.default_rng(3), data.TRAIN_PERIODS, 4, 50)
    np.testing.assert_array_equal(x, x2)
    x3, _ = data.sample_batch(np.random.default_rng(4), data.TRAIN_PERIODS, 4, 50)
    assert not np.array_equal(x, x3)
    # consecutive observations are DT apart on each moon's circle
    xv, _ = data.sample_batch(np.random.default_rng(0), [[1.0, 2.0, 3.0]], 2, 30)
    angle = np.arctan2(xv[..., 0::2], xv[..., 1::2])  # sin/cos -> angle
    step = np.angle(np.exp(1j * np.diff(angle, axis=1)))
    want = np.broadcast_to(2 * np.pi * data.DT / np.array([1.0, 2.0, 3.0]), step.shape)
    np.testing.assert_allclose(step, want, atol=1e-4)


def test_sample_batch_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="period_sets"):
        data.sample_batch(rng, [], 2, 10)
    with pytest.raises(ValueError, match="same length"):
        data.sample_batch(rng, [[1.0, 2.0], [1.0, 2.0, 3.0]], 2, 10)
    with pytest.raises(ValueError, match="grid_size"):
        data.sample_batch(rng, [[1.0]], 2, 10, grid_size=20)
    with pytest.raises(ValueError, match="batch_size"):
        data.sample_batch(rng, [[1.0]], 0, 10)


def test_moons_batches_draw_what_sample_batch_draws_and_keep_their_state():
    periods = data.TRAIN_PERIODS
    batches = data.MoonsBatches(periods, batch_size=3, length=20, seed=7, skip_sequences=1)
    rng = np.random.default_rng(7)
    data.sample_batch(rng, periods, 1, 20)  # the dropped sequence
    x, y = data.sample_batch(rng, periods, 3, 20)
    first = next(batches)
    assert first.shape == (3, 21, 6) and first.dtype == np.float32
    np.testing.assert_array_equal(first[:, :-1], x)
    np.testing.assert_array_equal(first[:, 1:], y)
    state = json.loads(json.dumps(batches.get_state()))  # JSON, as checkpoints keep it
    second = next(batches)
    again = data.MoonsBatches(periods, batch_size=3, length=20, seed=7, skip_sequences=1)
    again.set_state(state)
    np.testing.assert_array_equal(next(again), second)
    other = data.MoonsBatches(periods, batch_size=4, length=20, seed=7, skip_sequences=1)
    with pytest.raises(ValueError, match="other data settings"):
        other.set_state(state)


def test_moons_batches_on_a_sharding():
    import jax

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    plain = next(data.MoonsBatches([[1.0, 2.0, 3.0]], batch_size=4, length=8, seed=0))
    laid_out = next(data.MoonsBatches([[1.0, 2.0, 3.0]], batch_size=4, length=8, seed=0,
                                      sharding=sharding))
    assert laid_out.sharding == sharding
    np.testing.assert_array_equal(np.asarray(laid_out), plain)
