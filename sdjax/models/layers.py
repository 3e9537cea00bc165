"""Building blocks shared by the VAE and the UNet (NHWC throughout).

Submodule names mirror the attribute names of diffusers' PyTorch modules, with list indices joined by "_"
(``to_out.0`` -> ``to_out_0``), and :class:`Dense` and :class:`Conv` keep their kernels in PyTorch's layout
((out, in) and (out, in, kh, kw)), so that weight conversion in :mod:`sdjax.weights` is a renaming and loading
a checkpoint copies each tensor as it is stored, with no transposes.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = jnp.dtype

# On the CPU a 3x3 conv whose output has at most this many positions (batch x height x width) runs as one
# matmul over gathered patches ("im2col"): XLA:CPU's convolution is 2-3x slower than that matmul there (the
# UNet's 8x8 and 4x4 levels); above it the native convolution is faster (benchmarks/profile_unet.py).
CPU_IM2COL_MAX_POSITIONS = 512

# flax's default kernel initialiser (lecun_normal) for these layouts: fan-in is axis 1 (in) times the window.
_KERNEL_INIT = nn.initializers.lecun_normal(in_axis=1, out_axis=0)


class Dense(nn.Module):
    """A linear layer with PyTorch's kernel layout: (..., in) -> (..., features), ``kernel`` (features, in).

    The same function as ``flax.linen.Dense`` (whose kernel is (in, features)); keeping PyTorch's layout lets
    checkpoints load without a transpose, and XLA's matmuls read either layout at the same speed."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", _KERNEL_INIT, (self.features, x.shape[-1]), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (1,)), ((), ())))
        return y if bias is None else y + bias


class Conv(nn.Module):
    """A 2-d convolution on NHWC inputs with PyTorch's kernel layout (features, in, kh, kw).

    (B, H, W, in) -> (B, H', W', features). ``padding``: an int for every side or ((top, bottom), (left, right)).
    A 1x1 conv is a matmul; see :func:`conv2d` for the rest."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: int | Sequence[tuple[int, int]] = 0
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.features, x.shape[-1], *self.kernel_size)
        kernel = self.param("kernel", _KERNEL_INIT, shape, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        pad = self.padding
        padding = ((pad, pad), (pad, pad)) if isinstance(pad, int) else tuple(tuple(p) for p in pad)
        y = conv2d(x, kernel, tuple(self.strides), padding)
        return y if bias is None else y + bias


def conv2d(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: tuple[tuple[int, int], ...]
) -> jax.Array:
    """Cross-correlation of NHWC ``x`` (B, H, W, I) with an OIHW ``kernel`` (O, I, kh, kw) -> (B, H', W', O).

    A 1x1 stride-1 conv is a matmul everywhere. On the CPU, an output of at most ``CPU_IM2COL_MAX_POSITIONS``
    positions is one matmul over the gathered patches; otherwise ``lax.conv_general_dilated`` (cuDNN on GPU).
    On the CPU that convolution gets its kernel transposed to HWIO in the program: on an OIHW kernel inside
    ``lax.scan`` (the sampling loop) XLA:CPU falls back to a generic convolution 3.5x slower."""
    o, i, kh, kw = kernel.shape
    if (kh, kw) == (1, 1) and strides == (1, 1) and not any(p for side in padding for p in side):
        return jax.lax.dot_general(x, kernel.reshape(o, i), (((3,), (1,)), ((), ())))
    b, h, w, _ = x.shape
    out_h = (h + sum(padding[0]) - kh) // strides[0] + 1
    out_w = (w + sum(padding[1]) - kw) // strides[1] + 1
    if jax.default_backend() == "cpu" and b * out_h * out_w <= CPU_IM2COL_MAX_POSITIONS:
        return _im2col_conv(x, kernel, strides, padding, (out_h, out_w))
    if jax.default_backend() == "cpu":
        return jax.lax.conv_general_dilated(
            x, kernel.transpose(2, 3, 1, 0), strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "OIHW", "NHWC"))


@jax.named_scope("im2col_conv")  # benchmarks/profile_unet.py counts these ops as convolutions
def _im2col_conv(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: tuple, out_hw: tuple[int, int]
) -> jax.Array:
    (o, i, kh, kw), b, (out_h, out_w) = kernel.shape, x.shape[0], out_hw
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    rows, cols = strides[0] * (out_h - 1) + 1, strides[1] * (out_w - 1) + 1
    taps = [xp[:, dy : dy + rows : strides[0], dx : dx + cols : strides[1]] for dy in range(kh) for dx in range(kw)]
    # patches ordered (in, kh, kw), like the kernel's trailing axes
    patches = jnp.stack(taps, axis=-1).reshape(b, out_h, out_w, i * kh * kw)
    return jax.lax.dot_general(patches, kernel.reshape(o, i * kh * kw), (((3,), (1,)), ((), ())))


def attention_implementation(dtype: Dtype) -> str | None:
    """Which ``jax.nn.dot_product_attention`` kernel to ask for.

    cuDNN's fused (flash) attention runs only on GPU and only in 16-bit; everywhere else XLA's
    implementation is used (``None`` lets JAX pick it).
    """
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return None


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, upcast: bool = False, is_causal: bool = False
) -> jax.Array:
    """Multi-head attention on (B, T, N, H) tensors; returns (B, Tq, N, H) in q's dtype.

    ``upcast`` computes the softmax(q k^T) v in float32 (SD 2.x ``upcast_attention``), as diffusers does.
    On the CPU, non-causal attention goes through :func:`chunked_attention` (several times faster there).
    """
    out_dtype = q.dtype
    if upcast:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    if jax.default_backend() == "cpu" and not is_causal:
        return chunked_attention(q, k, v).astype(out_dtype)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation=attention_implementation(q.dtype))
    return out.astype(out_dtype)


# Blocks of float32 scores that stay in a CPU's cache (measured best on a 2-core Xeon, see chunked_attention):
# up to CPU_SCORES_BLOCK_BYTES over all heads when such a block still holds CPU_MIN_QUERY_BLOCK queries (short
# keys: cross-attention, low resolutions), else one head at a time, CPU_HEAD_QUERY_BLOCK queries per block.
CPU_SCORES_BLOCK_BYTES = 4 * 2**20
CPU_MIN_QUERY_BLOCK = 256
CPU_HEAD_QUERY_BLOCK = 512


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(H)) v on (B, T, N, H) tensors, computed in blocks that stay in a CPU's cache, with
    the scores and softmax in float32; returns (B, Tq, N, H) in q's dtype.

    XLA:CPU runs ``jax.nn.dot_product_attention`` as three passes over the whole (B, N, Tq, Tk) score matrix
    (64 MB for SD 1.5's 32x32 latents), out of cache: 90 ms for a (2, 1024, 8, 40) self-attention on a 2-core
    Xeon. In blocks of queries over all heads (~4 MB of scores) it takes 28 ms, but each head's share of a block
    is then only 64 queries; one head at a time (``lax.map``) in blocks of 512 queries makes each block's two
    products plain 2-D matmuls: 19 ms (PyTorch's fused CPU kernel: 11 ms). At 64x64 latents (4096 tokens): 818
    -> 273 ms (blocks of 256 / 512 / 1024 queries: 27 / 20 / 24 ms at 1024 tokens; of 64 / 128 / 256 / 512:
    516 / 329 / 334 / 273 ms at 4096). Short keys (cross-attention's 77) keep the all-heads blocks, faster
    there (2.6 vs 3.7 ms). The softmax is normalised after the value product (one pass less).
    """
    b, tq, n, h = q.shape
    tk = k.shape[1]
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q * jnp.asarray(h**-0.5, q.dtype), k, v))  # (B, N, T, H)
    row_bytes = b * n * tk * 4  # float32 scores of one query, all heads
    if tq * row_bytes <= CPU_SCORES_BLOCK_BYTES:
        out = _attention_block(q, k, v)
    elif CPU_SCORES_BLOCK_BYTES // row_bytes >= CPU_MIN_QUERY_BLOCK:
        chunk = _query_chunk(tq, CPU_SCORES_BLOCK_BYTES // row_bytes)
        blocks = q.reshape(b, n, tq // chunk, chunk, h).transpose(2, 0, 1, 3, 4)
        out = jax.lax.map(lambda q_block: _attention_block(q_block, k, v), blocks)
        out = out.transpose(1, 2, 0, 3, 4).reshape(b, n, tq, h)
    else:
        chunk = _query_chunk(tq, CPU_HEAD_QUERY_BLOCK)
        heads = (q.reshape(b * n, tq // chunk, chunk, h), k.reshape(b * n, tk, h), v.reshape(b * n, tk, h))

        def head(qkv: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:  # (Tq // chunk, chunk, H) queries
            q_blocks, k_head, v_head = qkv
            return jax.lax.map(lambda q_block: _attention_block(q_block, k_head, v_head), q_blocks)

        out = jax.lax.map(head, heads).reshape(b, n, tq, h)
    return out.transpose(0, 2, 1, 3).astype(q.dtype)


def _query_chunk(tq: int, limit: int) -> int:
    """The largest divisor of ``tq`` that is at most ``limit`` (all of tq if it fits or if only blocks of fewer
    than 8 queries would)."""
    if limit >= tq:
        return tq
    chunk = max((d for d in range(1, limit + 1) if tq % d == 0), default=1)
    return chunk if chunk >= 8 else tq


def _attention_block(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T) v over the last two axes of (..., Tq, H), (..., Tk, H) tensors, scores in float32."""
    s = jnp.einsum("...qh,...kh->...qk", q, k, preferred_element_type=jnp.float32)
    e = jnp.exp(s - s.max(axis=-1, keepdims=True))
    out = jnp.einsum("...qk,...kh->...qh", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out / e.sum(axis=-1, keepdims=True)


class Attention(nn.Module):
    """diffusers ``Attention``: q/k/v projections, multi-head attention, output projection.

    Input (B, T, C) and optional context (B, S, Cc) -> (B, T, out_dim or C). ``group_norm`` and residual are
    handled here only when ``norm_num_groups`` is set (the VAE's spatial self-attention, fed (B, H, W, C)).
    """

    heads: int
    dim_head: int
    qkv_bias: bool = False
    upcast_attention: bool = False
    norm_num_groups: int | None = None
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        spatial = x.ndim == 4
        residual = x
        if self.norm_num_groups is not None:
            x = nn.GroupNorm(self.norm_num_groups, epsilon=self.norm_eps, dtype=self.dtype, name="group_norm")(x)
        if spatial:
            b, h, w, c = x.shape
            x = x.reshape(b, h * w, c)
        channels = residual.shape[-1]
        context = x if context is None else context
        inner = self.heads * self.dim_head

        def proj(name: str, y: jax.Array) -> jax.Array:
            y = Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name=name)(y)
            return y.reshape(*y.shape[:-1], self.heads, self.dim_head)

        q, k, v = proj("to_q", x), proj("to_k", context), proj("to_v", context)
        out = dot_product_attention(q, k, v, upcast=self.upcast_attention)
        out = out.reshape(*out.shape[:-2], inner)
        out = Dense(channels, dtype=self.dtype, name="to_out_0")(out)
        if spatial:
            out = out.reshape(residual.shape)
        if self.norm_num_groups is not None:
            out = out + residual
        return out


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D``: (GroupNorm, SiLU, conv3x3) x 2 with an optional time embedding added
    between them and a 1x1 conv shortcut when channels change. (B, H, W, Cin) -> (B, H, W, out_channels)."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        h = nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name="norm1")(x)
        h = nn.swish(h)
        h = Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv1")(h)
        if temb is not None:
            t = Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.swish(temb))
            h = h + t[:, None, None, :]
        h = nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name="norm2")(h)
        h = nn.swish(h)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv halving H and W. ``pad_right_bottom`` reproduces the VAE encoder's asymmetric
    (0, 1, 0, 1) padding; otherwise padding is 1 on every side (UNet). (B, H, W, C) -> (B, H/2, W/2, C)."""

    channels: int
    pad_right_bottom: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        padding = ((0, 1), (0, 1)) if self.pad_right_bottom else ((1, 1), (1, 1))
        return Conv(self.channels, (3, 3), strides=(2, 2), padding=padding, dtype=self.dtype, name="conv")(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling (x2, or to ``output_size``) then a 3x3 conv.
    (B, H, W, C) -> (B, 2H, 2W, C) or (B, *output_size, C)."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        h, w = x.shape[1:3]
        if output_size is None or tuple(output_size) == (2 * h, 2 * w):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:  # PyTorch's "nearest": output pixel i reads input pixel floor(i * in / out)
            rows = (np.arange(output_size[0]) * h) // output_size[0]
            cols = (np.arange(output_size[1]) * w) // output_size[1]
            x = x[:, rows][:, :, cols]
        return Conv(self.channels, (3, 3), padding=1, dtype=self.dtype, name="conv")(x)
