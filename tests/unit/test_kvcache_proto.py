"""The committed gRPC code is what proto/kvcache.proto generates."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvcache._pb.generate import OUTPUTS, ROOT, generate


@pytest.mark.parametrize("name", OUTPUTS)
def test_committed_generated_code_matches_the_proto(tmp_path: Path, name: str) -> None:
    generate(tmp_path)
    assert (tmp_path / name).read_text() == (ROOT / name).read_text(), (
        f"{name} is stale: run `python -m kvcache._pb.generate`"
    )
