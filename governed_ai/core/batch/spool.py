"""Where a batch's outcomes go as items finish: a spool file on disk, so memory stays flat in the item count.

Items finish in any order; the spool appends each outcome's JSON line as it comes and remembers, per item
position, where the line is (12 bytes per item). Reading back in item order (for the results file, the
failures file, or a small XCom) is a pass over that index. A batch run across several processes has one
spool per process; :func:`merged` reads them together in item order.
"""

from __future__ import annotations

import os
import tempfile
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

#: Status codes kept per position (one byte each): 0 means not recorded yet.
_STATUS_CODES = {"ok": 1, "replayed": 2, "failed": 3, "not_run": 4}
_FAILED_CODES = frozenset({_STATUS_CODES["failed"], _STATUS_CODES["not_run"]})


@dataclass(frozen=True)
class SpoolIndex:
    """Where each position's line is in a spool file (picklable: a child process hands it back)."""

    path: str
    offsets: array[int]
    lengths: array[int]
    statuses: bytes

    def positions(self) -> Iterator[int]:
        return (p for p, status in enumerate(self.statuses) if status)


class OutcomeSpool:
    """Append-only outcome lines with a per-position index; see the module docstring.

    :param total: how many item positions the batch has (the index is sized for all of them).
    :param directory: where the spool file lives (default: the system temp directory). Put it on the
        disk the results go to, so writing them is a local copy.
    """

    def __init__(self, total: int, directory: str | os.PathLike[str] | None = None) -> None:
        handle, name = tempfile.mkstemp(prefix=".governed-ai-outcomes-", suffix=".spool", dir=directory)
        self._file: IO[bytes] = os.fdopen(handle, "w+b")
        self.path = name
        self._offsets = array("q", bytes(8 * total))
        self._lengths = array("i", bytes(4 * total))
        self._statuses = bytearray(total)
        self._end = 0

    def add(self, position: int, status: str, row: dict[str, Any]) -> None:
        line = orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE)
        # Only ever appended to through this handle (readers open the path): no seek, which would flush
        # the write buffer, a system call per item.
        self._file.write(line)
        self._offsets[position] = self._end
        self._lengths[position] = len(line)
        self._statuses[position] = _STATUS_CODES[status]
        self._end += len(line)

    def index(self) -> SpoolIndex:
        """Flush and describe the spool (for reading it here or in another process)."""
        self._file.flush()
        return SpoolIndex(self.path, self._offsets, self._lengths, bytes(self._statuses))

    def close(self, *, remove: bool = True) -> None:
        self._file.close()
        if remove:
            Path(self.path).unlink(missing_ok=True)


def merged(indexes: Sequence[SpoolIndex], *, failures_only: bool = False) -> Iterator[bytes]:
    """The JSON lines of every recorded position across ``indexes``, in item order (each position is in at
    most one spool); with ``failures_only``, only ``failed`` and ``not_run`` rows."""
    if not indexes:
        return
    total = len(indexes[0].statuses)
    files = [open(index.path, "rb") for index in indexes]  # noqa: SIM115 - closed below
    try:
        for position in range(total):
            for index, handle in zip(indexes, files, strict=True):
                status = index.statuses[position]
                if not status or (failures_only and status not in _FAILED_CODES):
                    continue
                handle.seek(index.offsets[position])
                yield handle.read(index.lengths[position])
                break
    finally:
        for handle in files:
            handle.close()


def count(indexes: Iterable[SpoolIndex], *, failures_only: bool = False) -> int:
    """How many rows :func:`merged` yields."""
    total = 0
    for index in indexes:
        if failures_only:
            total += sum(index.statuses.count(code) for code in _FAILED_CODES)
        else:
            total += len(index.statuses) - index.statuses.count(0)
    return total


def write_lines(lines: Iterable[bytes], out: IO[bytes]) -> int:
    """Copy ``lines`` to ``out`` in chunks; returns how many were written."""
    written = 0
    chunk: list[bytes] = []
    size = 0
    for line in lines:
        chunk.append(line)
        size += len(line)
        written += 1
        if size >= 1 << 20:
            out.write(b"".join(chunk))
            chunk, size = [], 0
    if chunk:
        out.write(b"".join(chunk))
    return written
