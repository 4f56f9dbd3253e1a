"""The alarm faults put the broker's own limits back, in the form it gave them."""

from __future__ import annotations

import pytest

from tests.reliability.faults import setting_args


@pytest.mark.parametrize(
    ("printed", "args"),
    [
        ("0.4", ["0.4"]),
        ("50000000", ["50000000"]),
        ("{absolute,1073741824}", ["absolute", "1073741824"]),
    ],
)
def test_a_printed_limit_becomes_rabbitmqctl_arguments(
    printed: str, args: list[str]
) -> None:
    assert setting_args(printed) == args
