"""The spatial transformer of the SD UNet (diffusers ``Transformer2DModel`` with ``BasicTransformerBlock`` s):
self-attention over the H*W positions, cross-attention to the text, a GEGLU feed-forward. NHWC."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from sdjax.models.layers import Attention, Conv, Dense

Dtype = jnp.dtype


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one Dense to 2*inner, split, value * GELU(gate) with PyTorch's exact (erf) GELU."""

    inner_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(Dense(2 * self.inner_dim, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers ``FeedForward`` with GEGLU: ``net.0`` (GEGLU to 4*dim), ``net.2`` (Dense back to dim)."""

    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        x = GEGLU(dim * self.mult, dtype=self.dtype, name="net_0")(x)
        return Dense(dim, dtype=self.dtype, name="net_2")(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to the context, GEGLU feed-forward, each residual.
    (B, T, C), context (B, S, D) -> (B, T, C)."""

    heads: int
    dim_head: int
    upcast_attention: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        def norm(name: str) -> nn.LayerNorm:
            return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=self.dtype, name=name)

        def attention(name: str) -> Attention:
            return Attention(
                self.heads, self.dim_head, upcast_attention=self.upcast_attention, dtype=self.dtype, name=name
            )

        x = x + attention("attn1")(norm("norm1")(x))
        x = x + attention("attn2")(norm("norm2")(x), context)
        return x + FeedForward(dtype=self.dtype, name="ff")(norm("norm3")(x))


_RematBasicTransformerBlock = nn.remat(BasicTransformerBlock)


@dataclasses.dataclass(frozen=True)
class TransformerSpec:
    """Per-block settings of a Transformer2DModel (hashable, so it can be a linen field)."""

    heads: int
    dim_head: int
    depth: int = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False


class Transformer2DModel(nn.Module):
    """diffusers ``Transformer2DModel`` on continuous input: GroupNorm(eps 1e-6), proj_in (1x1 conv or Dense),
    ``depth`` BasicTransformerBlocks over the H*W tokens, proj_out, residual. (B, H, W, C) -> (B, H, W, C)."""

    spec: TransformerSpec
    groups: int = 32
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        inner = self.spec.heads * self.spec.dim_head
        linear = self.spec.use_linear_projection
        hidden = nn.GroupNorm(self.groups, epsilon=1e-6, use_fast_variance=False, dtype=self.dtype, name="norm")(x)
        # A 1x1 conv on NHWC is the same matmul as a Dense; the two differ only in the stored kernel shape.
        if linear:
            hidden = Dense(inner, dtype=self.dtype, name="proj_in")(hidden.reshape(b, h * w, c))
        else:
            hidden = Conv(inner, (1, 1), dtype=self.dtype, name="proj_in")(hidden).reshape(b, h * w, inner)
        block = _RematBasicTransformerBlock if self.remat else BasicTransformerBlock
        for i in range(self.spec.depth):
            hidden = block(
                self.spec.heads,
                self.spec.dim_head,
                upcast_attention=self.spec.upcast_attention,
                dtype=self.dtype,
                name=f"transformer_blocks_{i}",
            )(hidden, context)
        if linear:
            hidden = Dense(c, dtype=self.dtype, name="proj_out")(hidden).reshape(b, h, w, c)
        else:
            hidden = Conv(c, (1, 1), dtype=self.dtype, name="proj_out")(hidden.reshape(b, h, w, inner))
        return hidden + x
