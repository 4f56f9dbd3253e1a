"""Number ranges for the ERP sandboxes: a fresh block of numbers per run.

A run against a broker whose store remembers an earlier run's documents (the
demo on PostgreSQL, run twice) must not hand out the same order, partner,
delivery or invoice numbers again: the xref registry would rightly refuse to
bind them to new deals. Each sandbox starts every kind of number a block of a
million higher; all stay within the ten digits SAP's numbers have.
"""

from __future__ import annotations

from typing import Final

__all__ = ["BLOCK_SIZE", "NUMBER_BLOCKS", "first_number"]

#: Numbers per block, per kind of document.
BLOCK_SIZE: Final = 1_000_000
#: How many blocks there are.
NUMBER_BLOCKS: Final = 1000


def first_number(block: int) -> int:
    """How far above its usual numbers a sandbox in *block* starts.

    Raises:
        ValueError: *block* is not in ``[0, NUMBER_BLOCKS)``.
    """
    if not 0 <= block < NUMBER_BLOCKS:
        raise ValueError(f"number_block must be in [0, {NUMBER_BLOCKS})")
    return block * BLOCK_SIZE
