"""Where a request's blocks sit in an engine's KV cache: per layer, which
dimension of the cache tensor indexes blocks, and the bytes of one block.

vLLM's attention backends lay their per-layer caches out differently:

=================  ==========================================  ===========
backend            logical shape                               block dim
=================  ==========================================  ===========
CPU (vLLM 0.32)    ``[num_blocks, heads, block_size, 2*head]``  0
FlashAttention     ``[2, num_blocks, block_size, heads, head]``  1
FlashInfer         ``[num_blocks, 2, block_size, heads, head]``  0
MLA                ``[num_blocks, block_size, latent]``          0
=================  ==========================================  ===========

and may permute the physical strides (FlashInfer's ``HND``, vLLM 0.32's
``KVCacheLayout``): gathering and scattering go through the logical view,
so the strides do not matter. Two instances can exchange blocks when their
:class:`KvLayout` are equal (same model, dtype, block size, parallelism).

This module imports no torch: it works on shapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict


class LayoutError(ValueError):
    """The KV cache's shape does not show where its blocks are."""


def block_dim(shape: Sequence[int], num_blocks: int) -> int:
    """The dimension of a per-layer cache tensor that indexes blocks.

    It is the dimension of size ``num_blocks``. When two match (a cache of
    2 blocks), the K/V pair dimension of FlashAttention's ``[2, B, ...]`` is
    the first of a 5-dimensional shape; otherwise blocks come first."""
    dims = [d for d, size in enumerate(shape) if size == num_blocks]
    if not dims:
        raise LayoutError(f"no dimension of size {num_blocks} (the block count) in {tuple(shape)}")
    if len(dims) > 1 and len(shape) == 5 and dims[:2] == [0, 1]:
        return 1
    return dims[0]


class LayerLayout(BaseModel):
    """One layer's cache: its shape with the block dimension of size 1."""

    model_config = ConfigDict(frozen=True)

    block_shape: tuple[int, ...]
    block_dim: int
    dtype: str
    """torch's name of the element type (``float16``, ``bfloat16``, ...)."""
    itemsize: int

    @property
    def block_bytes(self) -> int:
        return math.prod(self.block_shape) * self.itemsize

    def shape_of(self, count: int) -> tuple[int, ...]:
        """The shape of ``count`` of its blocks gathered together."""
        shape = list(self.block_shape)
        shape[self.block_dim] = count
        return tuple(shape)


class KvLayout(BaseModel):
    """Every layer's cache layout, in the order their blocks travel."""

    model_config = ConfigDict(frozen=True)

    layers: tuple[LayerLayout, ...]

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers."""
        return sum(layer.block_bytes for layer in self.layers)

    def mismatch(self, other: KvLayout) -> str | None:
        """Why blocks laid out as ``other`` cannot be loaded here (None: they can)."""
        if len(other.layers) != len(self.layers):
            return f"{len(other.layers)} layers against {len(self.layers)} here"
        for i, (theirs, ours) in enumerate(zip(other.layers, self.layers, strict=True)):
            if theirs != ours:
                return f"layer {i} is {theirs} against {ours} here"
        return None


def layer_layout(shape: Sequence[int], num_blocks: int, dtype: str, itemsize: int) -> LayerLayout:
    dim = block_dim(shape, num_blocks)
    block_shape = list(shape)
    block_shape[dim] = 1
    return LayerLayout(block_shape=tuple(block_shape), block_dim=dim, dtype=dtype,
                       itemsize=itemsize)  # fmt: skip
