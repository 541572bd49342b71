"""Whole-block copies between paged KV tensors and frames."""

from __future__ import annotations

import pytest
import torch

from kvcache.errors import ConfigError
from kvcache.framing import new_frame, open_frame, seal
from kvcache.kv_pages import PageCodec


def caches(fill: float | None = None) -> dict[str, torch.Tensor]:
    make = (lambda: torch.full((6, 2, 16, 8), fill)) if fill is not None else (lambda: torch.randn(6, 2, 16, 8))
    return {f"model.layers.{i}.attn": make() for i in range(3)}


def test_a_block_copied_out_and_in_lands_in_the_same_pages_of_every_layer() -> None:
    source, target = caches(), caches(0.0)
    out, into = PageCodec(source, 6), PageCodec(target, 6)
    frame, body = new_frame(b"k" * 32, out.block_bytes)
    out.read_block(4, body)
    into.write_block(1, open_frame(b"k" * 32, bytes(seal(frame))))  # read-only bytes, as tiers return
    for name in source:
        assert torch.equal(target[name][1], source[name][4])
        assert torch.count_nonzero(target[name][0]) == 0, "other blocks untouched"


def test_kernel_blocks_smaller_than_the_scheduler_block_are_copied_together() -> None:
    source = {"l": torch.randn(12, 2, 8, 8)}  # 6 scheduler blocks of 2 kernel blocks each
    target = {"l": torch.zeros(12, 2, 8, 8)}
    out, into = PageCodec(source, 6), PageCodec(target, 6)
    buffer = bytearray(out.block_bytes)
    out.read_block(2, buffer)
    into.write_block(2, buffer)
    assert torch.equal(target["l"][4:6], source["l"][4:6])


@pytest.mark.parametrize(
    ("tensors", "blocks", "page"),
    [
        pytest.param({"l": torch.randn(2, 6, 16, 8)}, 4, None, id="block-dim-not-outer"),
        pytest.param({"l": torch.randn(6, 16, 2, 8).transpose(1, 2)}, 6, None, id="not-contiguous"),
        pytest.param(caches(), 6, 999, id="page-size-mismatch"),
        pytest.param({}, 6, None, id="no-tensors"),
    ],
)
def test_layouts_that_are_not_whole_pages_are_refused(tensors, blocks: int, page: int | None) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError):
        PageCodec(tensors, blocks, expected_page_bytes=page)


def test_a_payload_of_the_wrong_size_is_refused() -> None:
    codec = PageCodec(caches(), 6)
    with pytest.raises(ValueError):
        codec.write_block(0, bytes(codec.block_bytes - 1))
    with pytest.raises(IndexError):
        codec.write_block(6, bytes(codec.block_bytes))
