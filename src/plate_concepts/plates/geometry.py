"""Plate formats and well names.

Wells are named by a row letter (A..Z, then AA..AF for 1536-well plates) and a 1-based column.
Every common spelling is accepted (``B7``, ``B07``, ``b007``, ``r02c07``, ``R2C7``); the canonical
spelling is the row letters and a two-digit column (``B07``), as JUMP/pycytominer tables use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_STANDARD_FORMATS = {6: (2, 3), 12: (3, 4), 24: (4, 6), 48: (6, 8), 96: (8, 12), 384: (16, 24), 1536: (32, 48)}

_LETTER_WELL = re.compile(r"^\s*([A-Za-z]{1,2})\s*0*(\d{1,3})\s*$")
_RC_WELL = re.compile(r"^\s*[Rr]0*(\d{1,3})\s*[Cc]0*(\d{1,3})\s*$")


@dataclass(frozen=True)
class PlateFormat:
    """A standard multi-well plate layout (rows x columns)."""

    n_rows: int
    n_columns: int

    @property
    def n_wells(self) -> int:
        return self.n_rows * self.n_columns

    @classmethod
    def from_n_wells(cls, n_wells: int) -> PlateFormat:
        if n_wells not in _STANDARD_FORMATS:
            raise ValueError(
                f"unknown plate format with {n_wells} wells; expected one of {sorted(_STANDARD_FORMATS)}"
            )
        return cls(*_STANDARD_FORMATS[n_wells])

    @classmethod
    def smallest_containing(cls, wells: list[str] | list[tuple[int, int]]) -> PlateFormat:
        """The smallest standard plate that has every given well (names or 0-based row, column)."""
        positions = [parse_well(w) if isinstance(w, str) else w for w in wells]
        max_row = max((r for r, _ in positions), default=0)
        max_col = max((c for _, c in positions), default=0)
        for rows, cols in sorted(_STANDARD_FORMATS.values(), key=lambda rc: rc[0] * rc[1]):
            if max_row < rows and max_col < cols:
                return cls(rows, cols)
        raise ValueError(
            f"well {well_name(max_row, max_col)} lies outside every standard plate (largest: 1536 wells, AF48)"
        )

    def contains(self, row: int, column: int) -> bool:
        return 0 <= row < self.n_rows and 0 <= column < self.n_columns

    def wells(self) -> list[str]:
        """All canonical well names, row by row."""
        return [well_name(r, c) for r in range(self.n_rows) for c in range(self.n_columns)]


def row_letters(row: int) -> str:
    """0 -> 'A', 25 -> 'Z', 26 -> 'AA' (1536-well plates run to 'AF')."""
    if row < 0:
        raise ValueError(f"row index must be >= 0, got {row}")
    return chr(ord("A") + row) if row < 26 else "A" + chr(ord("A") + row - 26)


def row_index(letters: str) -> int:
    """'A' -> 0, 'AA' -> 26."""
    letters = letters.upper()
    if len(letters) == 1:
        return ord(letters) - ord("A")
    if len(letters) == 2 and letters[0] == "A":
        return 26 + ord(letters[1]) - ord("A")
    raise ValueError(f"row {letters!r} is not a plate row (A..Z, AA..AF)")


def parse_well(name: str) -> tuple[int, int]:
    """Well name in any common spelling -> 0-based (row, column).

    >>> parse_well("B7"), parse_well("B07"), parse_well("r02c07")
    ((1, 6), (1, 6), (1, 6))
    """
    text = str(name)
    if m := _RC_WELL.match(text):
        row, col = int(m[1]) - 1, int(m[2]) - 1
    elif m := _LETTER_WELL.match(text):
        row, col = row_index(m[1]), int(m[2]) - 1
    else:
        raise ValueError(f"{name!r} is not a well name (expected e.g. 'B7', 'B07' or 'r02c07')")
    if row < 0 or col < 0:
        raise ValueError(f"{name!r} is not a well name: rows and columns start at 1")
    return row, col


def well_name(row: int, column: int, style: str = "padded") -> str:
    """0-based (row, column) -> a well name: 'padded' B07 (canonical), 'short' B7, 'rc' r02c07."""
    if style == "padded":
        return f"{row_letters(row)}{column + 1:02d}"
    if style == "short":
        return f"{row_letters(row)}{column + 1}"
    if style == "rc":
        return f"r{row + 1:02d}c{column + 1:02d}"
    raise ValueError(f"unknown well-name style {style!r}; expected 'padded', 'short' or 'rc'")


def canonical_well(name: str) -> str:
    """Any spelling -> the canonical one ('b7', 'B007', 'r02c07' -> 'B07')."""
    return well_name(*parse_well(name))
