"""sdjax.models.layers: PyTorch-layout Dense / Conv and the CPU convolution paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.models import layers


def reference_conv(x, kernel, strides, padding):
    """XLA's convolution on the OIHW kernel at full precision."""
    return jax.lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=("NHWC", "OIHW", "NHWC"), precision="highest"
    )


@pytest.mark.parametrize(
    ("shape", "out", "size", "strides", "padding"),
    [
        ((2, 8, 8, 6), 5, (3, 3), (1, 1), ((1, 1), (1, 1))),  # UNet / VAE 3x3
        ((2, 8, 8, 6), 5, (3, 3), (2, 2), ((1, 1), (1, 1))),  # UNet downsample
        ((1, 9, 7, 6), 5, (3, 3), (2, 2), ((0, 1), (0, 1))),  # VAE encoder downsample, odd sizes
        ((2, 5, 6, 6), 4, (1, 1), (1, 1), ((0, 0), (0, 0))),  # 1x1: a matmul
        ((1, 6, 6, 3), 2, (3, 3), (1, 1), ((0, 0), (0, 0))),  # no padding
    ],
)
@pytest.mark.parametrize("im2col", [True, False])
def test_conv2d_matches_xla_convolution_on_both_cpu_paths(monkeypatch, shape, out, size, strides, padding, im2col):
    monkeypatch.setattr(layers, "CPU_IM2COL_MAX_POSITIONS", 10**9 if im2col else 0)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape, np.float32))
    kernel = jnp.asarray(rng.standard_normal((out, shape[-1], *size), np.float32))
    ours = jax.jit(layers.conv2d, static_argnums=(2, 3))(x, kernel, strides, padding)
    expected = reference_conv(x, kernel, strides, padding)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_conv2d_in_a_scan_matches_the_lone_call():
    """The sampling loop's case: the kernel enters a lax.scan body (XLA:CPU compiles that conv differently)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 40, 40, 8), np.float32))  # 3200 positions: XLA's convolution
    kernel = jnp.asarray(rng.standard_normal((8, 8, 3, 3), np.float32) * 0.1)
    pad = ((1, 1), (1, 1))

    def loop(x, kernel):
        return jax.lax.scan(lambda h, _: (layers.conv2d(h, kernel, (1, 1), pad), None), x, None, length=2)[0]

    expected = reference_conv(reference_conv(x, kernel, (1, 1), pad), kernel, (1, 1), pad)
    np.testing.assert_allclose(jax.jit(loop)(x, kernel), expected, rtol=1e-4, atol=1e-4)


def test_dense_and_conv_keep_pytorch_kernel_layouts():
    x = jnp.ones((2, 8, 8, 6))
    conv = layers.Conv(5, (3, 3), padding=1)
    dense = layers.Dense(7)
    conv_params = conv.init(jax.random.key(0), x)["params"]
    dense_params = dense.init(jax.random.key(0), x)["params"]
    assert conv_params["kernel"].shape == (5, 6, 3, 3) and conv_params["bias"].shape == (5,)
    assert dense_params["kernel"].shape == (7, 6) and dense_params["bias"].shape == (7,)
    y = dense.apply({"params": dense_params}, x)
    expected = np.asarray(x) @ np.asarray(dense_params["kernel"]).T + np.asarray(dense_params["bias"])
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert "bias" not in layers.Dense(7, use_bias=False).init(jax.random.key(0), x)["params"]


def test_init_scales_by_fan_in_like_flax():
    """lecun_normal over (in, kh, kw): std 1/sqrt(in * kh * kw), the same distribution as flax's own layers."""
    x = jnp.ones((1, 4, 4, 64))
    kernel = layers.Conv(256, (3, 3), padding=1).init(jax.random.key(0), x)["params"]["kernel"]
    assert np.std(np.asarray(kernel)) == pytest.approx(1 / np.sqrt(64 * 9), rel=0.05)
    kernel = layers.Dense(512).init(jax.random.key(0), x)["params"]["kernel"]
    assert np.std(np.asarray(kernel)) == pytest.approx(1 / np.sqrt(64), rel=0.05)


def test_compute_dtype_casts_inputs_and_params():
    x = jnp.ones((1, 4, 4, 3), jnp.float32)
    conv = layers.Conv(2, (3, 3), padding=1, dtype=jnp.bfloat16)
    params = conv.init(jax.random.key(0), x)["params"]
    assert params["kernel"].dtype == jnp.float32  # stored in param_dtype
    assert conv.apply({"params": params}, x).dtype == jnp.bfloat16


def _count_loops(jaxpr) -> int:
    """Loops (scan / while, lax.map's included) in a closed jaxpr, nested ones counted."""
    count = 0
    for eqn in jaxpr.jaxpr.eqns:
        if eqn.primitive.name in ("scan", "while"):
            count += 1
        for param in eqn.params.values():
            if hasattr(param, "jaxpr") and hasattr(param, "consts"):
                count += _count_loops(param)
    return count


@pytest.mark.parametrize(
    ("b", "tq", "tk", "n", "h", "loops"),
    [
        (1, 16, 16, 2, 8, 0),  # scores fit one block
        (1, 96, 8, 2, 8, 1),  # short keys: blocks of 48 queries over all heads
        (2, 64, 64, 2, 8, 2),  # long keys: one head at a time, blocks of 16 queries
        (1, 67, 64, 2, 8, 2),  # a prime query count: one block per head (no divisor to split by)
    ],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_chunked_attention_matches_the_unchunked_softmax(monkeypatch, b, tq, tk, n, h, loops, dtype):
    monkeypatch.setattr(layers, "CPU_SCORES_BLOCK_BYTES", 4096)
    monkeypatch.setattr(layers, "CPU_MIN_QUERY_BLOCK", 16)
    monkeypatch.setattr(layers, "CPU_HEAD_QUERY_BLOCK", 16)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, tq, n, h), np.float32), dtype)
    k, v = (jnp.asarray(rng.standard_normal((b, tk, n, h), np.float32), dtype) for _ in range(2))
    if loops == 0:
        monkeypatch.setattr(layers, "CPU_SCORES_BLOCK_BYTES", 4 * 2**20)
    ours = jax.jit(layers.chunked_attention)(q, k, v)
    assert _count_loops(jax.make_jaxpr(layers.chunked_attention)(q, k, v)) == loops
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    scores = jnp.einsum("bqnh,bknh->bnqk", q32, k32, precision="highest") / np.sqrt(h)
    expected = jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(scores, axis=-1), v32, precision="highest")
    assert ours.shape == (b, tq, n, h) and ours.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(ours, np.float32), expected, rtol=tol, atol=tol)
