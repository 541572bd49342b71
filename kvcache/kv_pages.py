"""Copying whole KV blocks between an engine's paged KV tensors and frames.

vLLM's CPU backend keeps, per attention layer, one tensor whose outermost
dimension is the block: ``[num_blocks, kv_heads, block_size, 2 * head_size]``
with K and V interleaved inside each page. A stored block is every layer's
page of that block, laid end to end in layer-name order, copied as opaque
bytes: never token slices, so the payload is valid for any engine with the
same layout (which the namespace guarantees).

A layout this module cannot copy as whole contiguous pages (block dimension
not outermost, tensor not contiguous, sizes that do not divide) is refused at
registration with `ConfigError`; the connector then turns itself off rather
than risk handing an engine wrong KV.

Copies use ``memmove`` between the tensor's memory and the frame's buffer (no
temporary tensors, no GIL held during the copy).
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from kvcache.errors import ConfigError
from kvcache.framing import Buffer


@dataclass(frozen=True, slots=True)
class _Layer:
    name: str
    base: int  # address of block 0
    page: int  # bytes per block


class PageCodec:
    """Reads and writes whole blocks of a set of per-layer KV tensors.

    Args:
        kv_caches: layer name -> that layer's paged KV tensor.
        num_blocks: blocks in the engine's KV cache (the scheduler's count;
            a tensor may split each into several kernel blocks).
        expected_page_bytes: bytes of one block of one layer according to
            the engine's spec, checked against the tensors (None: not checked).

    Raises:
        ConfigError: a tensor whose blocks are not contiguous pages.
    """

    def __init__(
        self,
        kv_caches: Mapping[str, torch.Tensor],
        num_blocks: int,
        *,
        expected_page_bytes: int | None = None,
    ) -> None:
        if not kv_caches:
            raise ConfigError("no KV cache tensors registered")
        layers: list[_Layer] = []
        shapes: set[str] = set()
        for name in sorted(kv_caches):
            tensor = kv_caches[name]
            if tensor.device.type != "cpu":
                raise ConfigError(f"{name}: KV tensor on {tensor.device}, only CPU tensors are copied")
            if not tensor.is_contiguous():
                raise ConfigError(f"{name}: KV tensor is not contiguous")
            if tensor.dim() == 0 or tensor.shape[0] % num_blocks:
                raise ConfigError(f"{name}: outer dimension {tuple(tensor.shape)} is not {num_blocks} blocks")
            nbytes = tensor.numel() * tensor.element_size()
            page = nbytes // num_blocks
            if expected_page_bytes is not None and page != expected_page_bytes:
                raise ConfigError(f"{name}: {page} bytes per block, the engine's spec says {expected_page_bytes}")
            layers.append(_Layer(name, tensor.data_ptr(), page))
            shapes.add(f"{list(tensor.shape[1:])}x{tensor.shape[0] // num_blocks}:{tensor.dtype}")
        self._layers = layers
        self._tensors = dict(kv_caches)  # keep the memory alive
        self._num_blocks = num_blocks
        self.block_bytes = sum(layer.page for layer in layers)
        #: A description of the page layout (for logs and checks).
        self.layout = f"layers={len(layers)};pages={'|'.join(sorted(shapes))}"

    def read_block(self, block_id: int, out: Buffer) -> None:
        """Copy block `block_id` of every layer into `out` (exactly `block_bytes`)."""
        self._check(block_id, out)
        target = np.frombuffer(out, dtype=np.uint8)
        address = target.ctypes.data
        for layer in self._layers:
            ctypes.memmove(address, layer.base + block_id * layer.page, layer.page)
            address += layer.page

    def write_block(self, block_id: int, payload: Buffer) -> None:
        """Copy a payload made by `read_block` into block `block_id` of every layer."""
        self._check(block_id, payload)
        source = np.frombuffer(payload, dtype=np.uint8)
        address = source.ctypes.data
        for layer in self._layers:
            ctypes.memmove(layer.base + block_id * layer.page, address, layer.page)
            address += layer.page

    def _check(self, block_id: int, buffer: Buffer) -> None:
        if not 0 <= block_id < self._num_blocks:
            raise IndexError(f"block {block_id} outside 0..{self._num_blocks - 1}")
        size = memoryview(buffer).nbytes
        if size != self.block_bytes:
            raise ValueError(f"buffer of {size} bytes for a block of {self.block_bytes}")
