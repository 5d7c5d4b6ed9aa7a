"""Where operators read and write files: local paths and object-storage URIs alike."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import ObjectStoragePath


def is_uri(location: str) -> bool:
    return "://" in location


def storage_path(location: str) -> ObjectStoragePath:
    """A URI (``s3://...``, ``file://...``) as given, or a local path made absolute."""
    from airflow.providers.common.compat.sdk import ObjectStoragePath

    return ObjectStoragePath(location if is_uri(location) else Path(location).resolve().as_uri())


def read_text(location: str) -> str:
    """The UTF-8 text of a local file or an object-storage URI (``s3://...``)."""
    return storage_path(location).read_text(encoding="utf-8")


def relative_name(file: ObjectStoragePath, root: ObjectStoragePath) -> str:
    """``file``'s path below ``root`` as a POSIX string, e.g. ``billing/refunds.md``: the same on every
    Airflow line.

    Computed from the paths without their protocol because ``ObjectStoragePath.relative_to`` returns the
    full ``file:///...`` URI under universal-pathlib < 0.3 (Airflow 3.1 pins it), which would tie source
    names to where the files happen to live and break purge-by-source and idempotent reruns.
    """
    return PurePosixPath(file.path).relative_to(PurePosixPath(root.path)).as_posix()
