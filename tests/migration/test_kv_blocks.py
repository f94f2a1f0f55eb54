"""The block engine on CPU tensors laid out as vLLM's attention backends lay
out their caches: gather, a trip through raw bytes, scatter, byte-exact."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from migration.kv_blocks import BlockMover, BufferPool, as_memoryview, distinct_layers, host_buffer
from migration.kv_layout import KvLayout, LayoutError, block_dim
from tests.migration.device import DEVICE

NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD = 12, 16, 2, 8


def _cpu(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(NUM_BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD).to(DEVICE, dtype)


def _flash_attn(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(2, NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD).to(DEVICE, dtype)


def _flashinfer(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(NUM_BLOCKS, 2, BLOCK_SIZE, HEADS, HEAD).to(DEVICE, dtype)


def _flashinfer_hnd(dtype: torch.dtype) -> torch.Tensor:
    """Logical ``[B, 2, N, H, D]`` over memory laid out ``[B, 2, H, N, D]``."""
    physical = torch.randn(NUM_BLOCKS, 2, HEADS, BLOCK_SIZE, HEAD).to(DEVICE, dtype)
    return physical.permute(0, 1, 3, 2, 4)


def _mla(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(NUM_BLOCKS, BLOCK_SIZE, 40).to(DEVICE, dtype)


LAYOUTS: dict[str, Callable[[torch.dtype], torch.Tensor]] = {
    "cpu": _cpu, "flash_attn": _flash_attn, "flashinfer": _flashinfer,
    "flashinfer_hnd": _flashinfer_hnd, "mla": _mla,
}  # fmt: skip
BLOCK_DIM = {"cpu": 0, "flash_attn": 1, "flashinfer": 0, "flashinfer_hnd": 0, "mla": 0}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _bytes(t: torch.Tensor) -> bytes:
    return bytes(t.cpu().contiguous().view(torch.uint8).numpy())


def _block(layer: torch.Tensor, dim: int, block_id: int) -> bytes:
    return _bytes(layer.select(dim, block_id))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_bytes_scatter_round_trip_is_byte_exact(layout: str, dtype: torch.dtype) -> None:
    make = LAYOUTS[layout]
    source = [make(dtype) for _ in range(3)]
    dest = [torch.zeros_like(t) for t in source]
    src_ids, dst_ids = [7, 2, 9, 3, 11], [0, 10, 4, 5, 1]  # neither sorted nor contiguous
    mover, receiver = BlockMover(source, NUM_BLOCKS), BlockMover(dest, NUM_BLOCKS)
    assert receiver.layout.mismatch(mover.layout) is None
    dim = BLOCK_DIM[layout]
    assert all(spec.block_dim == dim for spec in mover.layout.layers)

    buffer = host_buffer(len(src_ids) * mover.block_bytes, mover.device)
    ends: list[int] = []
    assert mover.gather(src_ids, buffer, ends.append) == buffer.numel()
    assert ends[-1] == buffer.numel() and ends == sorted(ends) and len(ends) == 3
    # Through the wire's bytes: a fresh buffer filled from the memoryview.
    wire = bytes(as_memoryview(buffer))
    received = torch.frombuffer(bytearray(wire), dtype=torch.uint8)
    receiver.scatter(received, len(src_ids), dst_ids)

    for s_layer, d_layer in zip(source, dest, strict=True):
        for s, d in zip(src_ids, dst_ids, strict=True):
            assert _block(d_layer, dim, d) == _block(s_layer, dim, s)
        untouched = set(range(NUM_BLOCKS)) - set(dst_ids)
        for b in untouched:
            assert not d_layer.select(dim, b).any(), f"block {b} was written"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_scatter_of_a_part_of_a_buffer(layout: str) -> None:
    """A destination with some leading blocks cached loads only the rest."""
    source = [LAYOUTS[layout](torch.float16) for _ in range(2)]
    dest = [torch.zeros_like(t) for t in source]
    mover, receiver = BlockMover(source, NUM_BLOCKS), BlockMover(dest, NUM_BLOCKS)
    src_ids = [4, 5, 6, 1]
    buffer = host_buffer(len(src_ids) * mover.block_bytes, mover.device)
    mover.gather(src_ids, buffer)
    receiver.scatter(buffer, len(src_ids), [8, 2], start=1)  # gathered blocks 1 and 2
    dim = BLOCK_DIM[layout]
    for s_layer, d_layer in zip(source, dest, strict=True):
        assert _block(d_layer, dim, 8) == _block(s_layer, dim, 5)
        assert _block(d_layer, dim, 2) == _block(s_layer, dim, 6)
        assert sum(bool(d_layer.select(dim, b).any()) for b in range(NUM_BLOCKS)) == 2


def test_block_bytes_and_shapes_travel_in_the_layout() -> None:
    layers = [_flash_attn(torch.bfloat16), _flash_attn(torch.bfloat16)]
    layout = BlockMover(layers, NUM_BLOCKS).layout
    assert layout.block_bytes == 2 * (2 * BLOCK_SIZE * HEADS * HEAD * 2)
    assert layout.layers[0].shape_of(3) == (2, 3, BLOCK_SIZE, HEADS, HEAD)
    assert KvLayout.model_validate_json(layout.model_dump_json()) == layout


def test_a_layout_of_another_dtype_or_shape_is_a_mismatch() -> None:
    ours = BlockMover([_cpu(torch.float16)], NUM_BLOCKS).layout
    assert "layer 0" in (BlockMover([_cpu(torch.bfloat16)], NUM_BLOCKS).layout.mismatch(ours) or "")
    assert "layers" in (BlockMover([_cpu(torch.float16)] * 2, NUM_BLOCKS).layout.mismatch(ours)
                        or "")  # fmt: skip


def test_block_dim_detection() -> None:
    assert block_dim((12, 2, 16, 2, 8), 12) == 0
    assert block_dim((2, 12, 16, 2, 8), 12) == 1
    assert block_dim((2, 2, 16, 2, 8), 2) == 1  # FlashAttention's K/V pair first
    assert block_dim((2, 2, 16, 16), 2) == 0
    with pytest.raises(LayoutError, match="no dimension of size 7"):
        block_dim((12, 2, 16, 16), 7)


def test_shared_caches_move_once() -> None:
    a, b = _cpu(torch.float32), _cpu(torch.float32)
    assert len(distinct_layers([a, b, a])) == 2


def test_buffer_pool_reuses_the_smallest_fit_within_its_budget() -> None:
    pool = BufferPool(torch.device("cpu"), budget_bytes=3000)
    small, large = pool.take(500), pool.take(2000)
    pool.give(small)
    pool.give(large)
    assert pool.free_bytes == 2500
    again = pool.take(400)  # the 500-byte buffer, sliced
    assert again.numel() == 400 and again.data_ptr() == small.data_ptr()
    assert pool.take(1500).data_ptr() == large.data_ptr()
    assert pool.free_bytes == 0
    pool.give(host_buffer(4000, torch.device("cpu")))  # beyond the budget: not kept
    assert pool.free_bytes == 0
