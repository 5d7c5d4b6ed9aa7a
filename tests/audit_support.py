"""A keyed, anchored audit store for tests that build the core objects themselves.

An unkeyed store (``AuditStore(engine)``) still writes, but its chain can never verify ``ok``: tests that
check ``verify().ok`` use this instead, as the governance hook does in a deployment.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from sqlalchemy import Engine

from governed_ai.core.audit import AuditStore
from governed_ai.core.audit_anchors import AnchorLog
from governed_ai.core.keys import DeploymentKey

TEST_AUDIT_KEY = DeploymentKey.from_text("tests-audit-key-0123456789abcdef", source="tests")


def keyed_audit_store(engine: Engine, **kwargs: Any) -> AuditStore:
    """An :class:`AuditStore` keyed with :data:`TEST_AUDIT_KEY`, anchoring into a fresh directory under the
    test session's AIRFLOW_HOME (removed at the end of the session)."""
    anchors = AnchorLog(tempfile.mkdtemp(prefix="anchors-", dir=os.environ.get("AIRFLOW_HOME")))
    return AuditStore(engine, key=TEST_AUDIT_KEY, anchors=anchors, **kwargs)
