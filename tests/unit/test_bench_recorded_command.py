"""The command a bench report names: what decides the figures, without where the results went."""

from __future__ import annotations

import pytest

from kvgate.bench.cli import recorded_command


@pytest.mark.parametrize(
    ("argv", "recorded"),
    [
        ([], "kvgate bench"),
        (["--out", "results/x", "--no-progress"], "kvgate bench"),
        (["--workloads", "mixed", "--out", "r", "--seed", "2"], "kvgate bench --workloads mixed --seed 2"),
        (["--out=r", "--repeat", "3"], "kvgate bench --repeat 3"),
        (["--quick", "--no-progress", "--kvgate-arg=--config=a b.yaml"], "kvgate bench --quick '--kvgate-arg=--config=a b.yaml'"),
        # A value that looks like an option stays: only the option names are matched.
        (["--sizes", "sizes.toml", "--routers", "kvgate:kv-aware@--out.yaml"],
         "kvgate bench --sizes sizes.toml --routers kvgate:kv-aware@--out.yaml"),
    ],
)
def test_the_output_options_are_left_out_and_every_other_kept(argv: list[str], recorded: str) -> None:
    assert recorded_command(argv) == recorded
