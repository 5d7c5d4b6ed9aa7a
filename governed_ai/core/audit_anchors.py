"""Anchors of the audit chain head, kept outside the governance database.

The chain's HMAC stops anyone without the key from recomputing it, but someone who can write the
database can still cut the newest records off and move the stored head back to the last record they
kept: the shorter chain is intact. An anchor is a copy of the head, ``(seq, hash, time)``, written
somewhere else (a file on the worker, or an object-storage path) and logged to the task log; an anchored
seq that the database no longer reaches, or whose hash differs, exposes the cut. Only records written
after the newest anchor can disappear unnoticed, so anchors are written every few records or seconds.

Each anchor carries the key id and its own MAC, so a forged or edited anchor line is recognised as such.

Layout: one location per deployment; under it, each chain (identified by the keyed hash of its first
record, which nobody without the key can change) gets

* on a local filesystem: ``<location>/chain-<id>.jsonl``, one JSON object per line, appended;
* on object storage (anything that is not a local path, e.g. an Airflow ``ObjectStoragePath`` for
  ``s3://...``, which has no append): one object per anchor, ``<location>/chain-<id>/<seq>-<time>.json``.

Both are read back by :meth:`AnchorLog.read`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from governed_ai.core.keys import DeploymentKey
from governed_ai.core.sqlstore import as_utc

logger = logging.getLogger("governed_ai.audit")

ANCHOR_PURPOSE = "audit-anchor"


class Anchor(BaseModel):
    """The chain head at one moment: the record ``seq`` had hash ``hash``."""

    model_config = ConfigDict(frozen=True)

    seq: int
    hash: str
    time: datetime
    key_id: str
    mac: str

    @staticmethod
    def _payload(chain_id: str, seq: int, chain_hash: str, time: datetime, key_id: str) -> bytes:
        moment = as_utc(time).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return f"{chain_id}|{seq}|{chain_hash}|{moment}|{key_id}".encode()

    @classmethod
    def make(cls, key: DeploymentKey, chain_id: str, seq: int, chain_hash: str, time: datetime) -> Anchor:
        """A signed anchor of ``(seq, chain_hash)`` of chain ``chain_id``."""
        mac = key.hasher(ANCHOR_PURPOSE).hexdigest(cls._payload(chain_id, seq, chain_hash, time, key.key_id))
        return cls(seq=seq, hash=chain_hash, time=as_utc(time), key_id=key.key_id, mac=mac)

    def authentic(self, key: DeploymentKey, chain_id: str) -> bool:
        """Whether this anchor was written for ``chain_id`` with ``key`` and not changed since."""
        payload = self._payload(chain_id, self.seq, self.hash, self.time, self.key_id)
        return self.key_id == key.key_id and key.hasher(ANCHOR_PURPOSE).matches(payload, self.mac)

    def to_line(self) -> str:
        """One JSON line (no newline)."""
        return json.dumps(
            {
                "seq": self.seq,
                "hash": self.hash,
                "time": as_utc(self.time).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "key_id": self.key_id,
                "mac": self.mac,
            },
            sort_keys=True,
        )


class AnchorsRead(BaseModel):
    """What :meth:`AnchorLog.read` found: parsed anchors and how many entries could not be read."""

    model_config = ConfigDict(frozen=True)

    anchors: list[Anchor]
    unreadable: int = 0


class AnchorLog:
    """Writes and reads the anchors of the audit chain heads under one location.

    ``location`` is a local directory (``str`` or ``os.PathLike``) or any object with the
    ``pathlib``-like methods ``joinpath``, ``iterdir``, ``open``, ``mkdir`` and ``name`` (an Airflow
    ``ObjectStoragePath``, a ``upath.UPath``). Thread-safe; several processes may write at once (local
    lines are appended with single ``O_APPEND`` writes; objects never overwrite each other).
    """

    def __init__(self, location: str | os.PathLike[str] | Any) -> None:
        if isinstance(location, str) and "://" not in location:
            location = Path(location)
        self._local = isinstance(location, os.PathLike) and not hasattr(location, "protocol")
        self._location: Any = Path(os.fspath(location)) if self._local else location
        self._lock = threading.Lock()

    @property
    def location(self) -> str:
        """The location as text (for messages)."""
        return str(self._location)

    def describe(self, chain_id: str) -> str:
        """Where the anchors of ``chain_id`` are."""
        if self._local:
            return str(self._location / f"{_file_stem(chain_id)}.jsonl")
        return str(self._location.joinpath(_file_stem(chain_id)))

    def write(self, chain_id: str, anchor: Anchor) -> None:
        """Append one anchor of ``chain_id``."""
        line = anchor.to_line() + "\n"
        with self._lock:
            if self._local:
                self._append_local(self._location / f"{_file_stem(chain_id)}.jsonl", line)
            else:
                folder = self._location.joinpath(_file_stem(chain_id))
                with contextlib.suppress(NotImplementedError, OSError):  # object stores have no folders
                    folder.mkdir(parents=True, exist_ok=True)
                name = f"{anchor.seq:012d}-{anchor.time.strftime('%Y%m%dT%H%M%S%fZ')}.json"
                with folder.joinpath(name).open("w") as handle:
                    handle.write(line)

    @staticmethod
    def _append_local(path: Path, line: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = line.encode("utf-8")
        # One write() with O_APPEND: lines from concurrent processes never interleave (they are far
        # shorter than PIPE_BUF); fsync so an anchor survives a crash of the machine right after it.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, chain_id: str) -> AnchorsRead:
        """Every anchor of ``chain_id``, oldest seq first; a missing location reads as no anchors."""
        anchors: list[Anchor] = []
        unreadable = 0
        for text in self._texts(chain_id):
            for line in text.splitlines():
                if not line.strip():
                    continue
                try:
                    anchors.append(Anchor.model_validate_json(line))
                except ValueError:
                    unreadable += 1
        anchors.sort(key=lambda a: (a.seq, a.time))
        return AnchorsRead(anchors=anchors, unreadable=unreadable)

    def _texts(self, chain_id: str) -> list[str]:
        if self._local:
            path = self._location / f"{_file_stem(chain_id)}.jsonl"
            return [path.read_text(encoding="utf-8")] if path.exists() else []
        folder = self._location.joinpath(_file_stem(chain_id))
        try:
            entries = sorted(folder.iterdir(), key=lambda p: p.name)
        except FileNotFoundError:
            return []
        texts: list[str] = []
        for entry in entries:
            if entry.name.endswith(".json"):
                with entry.open("r") as handle:
                    texts.append(handle.read())
        return texts


def _file_stem(chain_id: str) -> str:
    return f"chain-{chain_id[:32]}"


__all__ = ["ANCHOR_PURPOSE", "Anchor", "AnchorLog", "AnchorsRead"]
