"""Specification of sdjax.interpolation.slerp."""

import numpy as np
import pytest

from sdjax.interpolation import PARALLEL_DOT, slerp


def _orthogonal_pair(shape=(8, 8, 4), seed=0):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((2, *shape))
    b -= np.vdot(a, b) / np.vdot(a, a) * a  # Gram-Schmidt
    return a, b * np.linalg.norm(a) / np.linalg.norm(b)


def test_endpoints_are_the_inputs():
    a, b = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    out = np.asarray(slerp(np.array([0.0, 1.0]), a, b))
    assert out.shape == (2, 8, 8, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], a, atol=1e-5)
    np.testing.assert_allclose(out[1], b, atol=1e-5)


def test_orthogonal_inputs_of_one_norm_keep_that_norm_all_the_way():
    a, b = _orthogonal_pair()
    out = np.asarray(slerp(np.linspace(0, 1, 9), a, b))
    norms = np.linalg.norm(out.reshape(9, -1), axis=1)
    np.testing.assert_allclose(norms, np.linalg.norm(a), rtol=1e-5)
    lerp_mid = np.linalg.norm((a + b) / 2)
    assert lerp_mid < 0.75 * np.linalg.norm(a)  # what slerp avoids: a straight line sags towards zero


def test_the_half_way_point_bisects_the_angle():
    a, b = _orthogonal_pair(seed=2)
    np.testing.assert_allclose(slerp(0.5, a, b), (a + b) / np.sqrt(2), atol=1e-5)
    v0, v1 = np.array([1.0, 0.0]), np.array([np.cos(1.2), np.sin(1.2)])  # 1.2 rad apart
    np.testing.assert_allclose(slerp(0.5, v0, v1), [np.cos(0.6), np.sin(0.6)], atol=1e-6)
    np.testing.assert_allclose(slerp(0.25, v0, v1), [np.cos(0.3), np.sin(0.3)], atol=1e-6)


def test_parallel_vectors_interpolate_linearly():
    v = np.random.default_rng(3).standard_normal((4, 5)).astype(np.float32)
    t = np.linspace(0, 1, 5)
    for w in (3 * v, -2 * v, v * (1 + 1e-4)):  # parallel, anti-parallel and nearly parallel: no division by ~0
        out = np.asarray(slerp(t, v, w))
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out, (1 - t)[:, None, None] * v + t[:, None, None] * w, rtol=1e-5, atol=1e-6)
    assert PARALLEL_DOT < 1


def test_a_scalar_t_gives_one_interpolant_of_the_inputs_shape():
    a, b = _orthogonal_pair(shape=(77, 16), seed=4)
    assert slerp(0.3, a, b).shape == (77, 16)


def test_inputs_of_different_shapes_are_rejected():
    with pytest.raises(ValueError, match="shape"):
        slerp(0.5, np.zeros((2, 3)), np.zeros((3, 2)))
