"""Sensor that waits until a Chroma collection exists and is full (or fresh) enough to be read."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowFailException, BaseSensorOperator

from governed_ai.core.errors import GovernanceDenied
from governed_ai.core.retrieval.chroma_store import EmbeddingModelMismatch
from governed_ai.core.retrieval.governed import GovernedRetrieval
from governed_ai.hooks.chroma import ChromaHook
from governed_ai.hooks.governance import GovernanceHook
from governed_ai.operators.chroma import as_datetime, check_collection_name
from governed_ai.operators.errors import airflow_errors
from governed_ai.triggers.chroma import ChromaCollectionTrigger

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context


class ChromaCollectionSensor(BaseSensorOperator):
    """Wait until ``collection`` exists and holds at least ``min_count`` chunks (and, with ``newer_than``,
    one ingested after that moment) — e.g. a RAG DAG waiting for the nightly ingest.

    It does not hold a worker slot while waiting: the default ``mode`` is ``"reschedule"``, and with
    ``deferrable=True`` the wait moves to the triggerer. The policy must grant ``read`` on the collection;
    a denial fails the task at once (audited). Checks read counts only, never content.

    :param collection: Collection to wait for. Templated.
    :param min_count: Minimum number of chunks (default 1).
    :param newer_than: Require a chunk ingested after this moment (datetime or ISO 8601 string, e.g.
        ``"{{ data_interval_start }}"``). Templated.
    :param deferrable: Wait in the triggerer instead of rescheduling (needs a running triggerer).
    :param chroma_conn_id: Connection of type ``governed_ai_chroma`` (optional).
    :param governance_conn_id: Connection of type ``governed_ai_governance`` (optional; default
        ``governed_ai_governance_default``). Only connections the deployment lists in ``[governed_ai]
        allowed_governance_conn_ids`` may be named; any other fails the task before any call.

    Other parameters (``poke_interval``, ``timeout``, ``mode``, ...) are those of ``BaseSensorOperator``.
    """

    template_fields: Sequence[str] = ("collection", "newer_than")
    ui_color = "#e6f4ea"

    def __init__(
        self,
        *,
        collection: str,
        min_count: int = 1,
        newer_than: datetime | str | None = None,
        deferrable: bool = False,
        chroma_conn_id: str = ChromaHook.default_conn_name,
        governance_conn_id: str = GovernanceHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("mode", "reschedule")
        super().__init__(**kwargs)
        if min_count < 0:
            raise ValueError(f"{self.task_id}: 'min_count' must be 0 or more, got {min_count}.")
        if isinstance(collection, str) and "{{" not in collection:
            check_collection_name(self.task_id, collection)
        self.collection = collection
        self.min_count = min_count
        self.newer_than = newer_than
        self.deferrable = deferrable
        self.chroma_conn_id = chroma_conn_id
        self.governance_conn_id = governance_conn_id

    @cached_property
    def retrieval(self) -> GovernedRetrieval:
        with airflow_errors(self.task_id):  # a governance connection the deployment does not allow
            governance = GovernanceHook(governance_conn_id=self.governance_conn_id)
        return GovernedRetrieval(
            governance.governor, ChromaHook(chroma_conn_id=self.chroma_conn_id).store(None)
        )

    def _newer_than(self) -> datetime | None:
        if self.newer_than in (None, ""):
            return None
        return as_datetime(self.task_id, self.newer_than)

    def poke(self, context: Context) -> bool:
        subject = GovernanceHook.subject_from_context(context)
        try:
            ready, _count, reason = self.retrieval.readiness(
                subject, self.collection, min_count=self.min_count, newer_than=self._newer_than()
            )
        except (GovernanceDenied, EmbeddingModelMismatch) as error:
            raise AirflowFailException(f"{self.task_id}: {error}") from error
        self.log.info("%s", reason)
        return ready

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        if self.poke(context):  # no need to defer when it is already ready
            return None
        newer = self._newer_than()
        self.defer(
            trigger=ChromaCollectionTrigger(
                collection=self.collection,
                min_count=self.min_count,
                chroma_conn_id=self.chroma_conn_id,
                poll_interval=float(self.poke_interval),
                newer_than=newer.isoformat() if newer else None,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=float(self.timeout)),
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> None:
        if event.get("status") != "success":
            raise AirflowFailException(f"{self.task_id}: waiting for {self.collection!r} failed: {event}")
        self.log.info("%s", event.get("message"))
