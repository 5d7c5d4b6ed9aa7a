"""Where operators read and write files: local paths and object-storage URIs alike."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath


def is_uri(location: str) -> bool:
    return "://" in location


def storage_path(location: str) -> ObjectStoragePath:
    """A URI (``s3://...``, ``file://...``) as given, or a local path made absolute."""
    from airflow.sdk import ObjectStoragePath

    return ObjectStoragePath(location if is_uri(location) else Path(location).resolve().as_uri())


def read_text(location: str) -> str:
    """The UTF-8 text of a local file or an object-storage URI (``s3://...``)."""
    return storage_path(location).read_text(encoding="utf-8")
