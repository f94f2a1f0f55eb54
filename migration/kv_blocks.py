"""Moving blocks between an engine's KV cache and host memory, on any device.

A request's blocks are gathered from every layer with one ``index_select``
per layer into one host buffer (Llumnix's block fusion: one message per
stage instead of one per block and layer), and scattered into the
destination's blocks with one ``index_copy_`` per layer. The buffer holds
the layers one after another, each as ``layer.index_select(block_dim,
ids)`` would return it (:class:`migration.kv_layout.LayerLayout`).

On a CUDA (or other accelerator) cache the copies run on a stream of their
own, into and out of pinned host buffers, and are synchronised by events:
the gather never queues behind the model's kernels, and the scatter's
upload overlaps the previous layers' ``index_copy_``. On CPU the gather
writes straight into the buffer (``index_select(..., out=)``): one copy.
Nothing here converts an engine tensor to numpy; buffers are handed to
sockets as memoryviews of host tensors this module allocates.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence

import torch

from migration.kv_layout import KvLayout, LayerLayout, layer_layout


def host_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """A host byte buffer for blocks of a cache on ``device``: pinned when
    the device is an accelerator, so copies to and from it are asynchronous."""
    pin = device.type != "cpu"
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


class BufferPool:
    """Host buffers kept for reuse: fresh memory costs a page fault per
    4 KiB, about as much as the copy itself (7 ms for 29 MiB here), and a
    source's reads and a destination's stages come and go.

    ``take`` hands out the smallest free buffer that fits (sliced to size)
    or a new one; ``give`` keeps it while the free buffers stay within
    ``budget_bytes``."""

    def __init__(self, device: torch.device, budget_bytes: int = 512 * 1024 * 1024) -> None:
        self._device = device
        self._budget = budget_bytes
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    @property
    def free_bytes(self) -> int:
        return sum(b.numel() for b in self._free)

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fits:  # by position: tensors compare element-wise
                best = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
                return best[:nbytes]
        return host_buffer(nbytes, self._device)

    def give(self, buffer: torch.Tensor) -> None:
        base = buffer if buffer._base is None else buffer._base
        assert isinstance(base, torch.Tensor)
        with self._lock:
            if self.free_bytes + base.numel() <= self._budget:
                self._free.append(base)


def as_memoryview(buffer: torch.Tensor) -> memoryview:
    """The bytes of a contiguous host byte tensor, without a copy."""
    assert buffer.device.type == "cpu" and buffer.dtype == torch.uint8 and buffer.is_contiguous()
    return memoryview(buffer.numpy()).cast("B")


def distinct_layers(layers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The caches of ``layers`` without repeats (layers that share their KV
    cache register the same tensor under several names)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out = []
    for layer in layers:
        ident = (layer.data_ptr(), tuple(layer.shape))
        if ident not in seen:
            seen.add(ident)
            out.append(layer)
    return out


class BlockMover:
    """Gathers and scatters blocks of one engine's cache (all its layers)."""

    def __init__(self, layers: Sequence[torch.Tensor], num_blocks: int) -> None:
        if not layers:
            raise ValueError("no KV cache layers")
        self._layers = list(layers)
        self.device = self._layers[0].device
        self.layout = KvLayout(layers=tuple(
            layer_layout(t.shape, num_blocks, str(t.dtype).removeprefix("torch."), t.element_size())
            for t in self._layers))  # fmt: skip
        accelerated = self.device.type != "cpu"
        self._stream = torch.Stream(self.device) if accelerated else None

    @property
    def block_bytes(self) -> int:
        return self.layout.block_bytes

    def _ids(self, block_ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(block_ids), dtype=torch.long, device=self.device)

    def _views(
        self, buffer: torch.Tensor, count: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, LayerLayout]]:
        """Each layer with its slice of ``buffer`` (``count`` gathered blocks)."""
        offset = 0
        for layer, spec in zip(self._layers, self.layout.layers, strict=True):
            n = count * spec.block_bytes
            view = buffer[offset : offset + n].view(layer.dtype).view(spec.shape_of(count))
            yield layer, view, spec
            offset += n

    def gather(self, block_ids: Sequence[int], buffer: torch.Tensor,
               after_layer: Callable[[int], None] = lambda n: None) -> int:  # fmt: skip
        """Copy blocks ``block_ids`` of every layer into ``buffer`` (host, at
        least ``len(block_ids) * block_bytes``); ``after_layer(end)`` is told
        after each layer that the buffer is filled up to byte ``end``, so a
        sender can start on it. Returns the bytes written."""
        count, ids, end = len(block_ids), self._ids(block_ids), 0
        for layer, view, spec in self._views(buffer, count):
            if self._stream is None:
                torch.index_select(layer, spec.block_dim, ids, out=view)
            else:
                with self._stream:
                    view.copy_(layer.index_select(spec.block_dim, ids), non_blocking=True)
                    self._stream.record_event().synchronize()
            end += view.numel() * view.element_size()
            after_layer(end)
        return end

    def scatter(self, buffer: torch.Tensor, count: int, block_ids: Sequence[int],
                start: int = 0) -> None:  # fmt: skip
        """Copy gathered blocks ``[start, start + len(block_ids))`` of a buffer
        holding ``count`` blocks into this cache's blocks ``block_ids``.

        On an accelerator, every layer's slice is uploaded on the mover's
        stream and the ``index_copy_`` runs on the current stream once its
        upload's event has fired, so the next forward sees the blocks."""
        n = len(block_ids)
        if n == 0:
            return
        ids = self._ids(block_ids)
        if self._stream is None:
            for layer, view, spec in self._views(buffer, count):
                layer.index_copy_(spec.block_dim, ids, view.narrow(spec.block_dim, start, n))
            return
        current = torch.accelerator.current_stream(self.device)
        uploads = []
        for layer, view, spec in self._views(buffer, count):
            with self._stream:
                part = view.narrow(spec.block_dim, start, n).to(self.device, non_blocking=True)
                done = self._stream.record_event()
            uploads.append((layer, part, spec, done))
        for layer, part, spec, done in uploads:
            current.wait_event(done)
            layer.index_copy_(spec.block_dim, ids, part)
            part.record_stream(current)  # type: ignore[arg-type]
