"""Regenerate kvcache/_pb from proto/kvcache.proto with grpcio-tools.

Run from anywhere: ``python -m kvcache._pb.generate``. The test suite calls
`generate` into a temporary directory and compares with the committed files.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto" / "kvcache.proto"
#: Files produced, relative to the output root.
OUTPUTS = ("kvcache/_pb/kvcache_pb2.py", "kvcache/_pb/kvcache_pb2.pyi", "kvcache/_pb/kvcache_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Compile the .proto into `out_root`/kvcache/_pb/.

    Returns:
        The generated files.

    Raises:
        RuntimeError: protoc failed.
    """
    from grpc_tools import protoc  # test/dev dependency only

    (out_root / "kvcache" / "_pb").mkdir(parents=True, exist_ok=True)
    status = protoc.main(
        [
            "protoc",
            f"--proto_path=kvcache/_pb={PROTO.parent}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            "kvcache/_pb/kvcache.proto",
        ]
    )
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status}")
    return [out_root / name for name in OUTPUTS]


def main() -> int:
    """Regenerate in place."""
    for path in generate(ROOT):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
