"""Who is asking: the Airflow task a governed call is made on behalf of."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Subject(BaseModel):
    """The identity that policy rules match and audit records carry.

    Built from the Airflow task context by the governance hook; plain data so the policy engine,
    the budget ledger and the audit trail never need Airflow.
    """

    model_config = ConfigDict(frozen=True)

    dag_id: str
    task_id: str
    run_id: str = "manual"
    try_number: int = 1
    map_index: int = -1
    owner: str = "airflow"
    tags: frozenset[str] = Field(default_factory=frozenset)
    bundle: str | None = Field(
        default=None,
        description=(
            "the DAG bundle the DAG was loaded from: set by the deployment (bundle configuration), not by "
            "DAG code, unlike dag_id, owner and tags; None when Airflow could not say"
        ),
    )
