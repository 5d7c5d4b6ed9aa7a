"""Optional parse-time enforcement: an Airflow cluster policy that refuses, when a DAG file is imported,
tasks asking for a model, tool or collection the governance policy does not grant them.

Runtime enforcement (the governed client, the tool runner, the Chroma operators) is what protects the
deployment; this policy only moves the bad news earlier: the DAG shows an import error naming the task,
what it asked for and the rule to change, instead of a task failing at 3 a.m. It is off unless the
deployment enables it, in ``airflow_local_settings.py`` (on the DAG processor's ``PYTHONPATH``, e.g.
``$AIRFLOW_HOME/config/``)::

    from governed_ai.cluster_policy import task_policy  # noqa: F401

or, with a ``task_policy`` of its own, by calling :func:`check_task` from it.

What is checked, per task of this provider (other operators are left alone):

* ``LLMOperator``, ``LLMBatchOperator`` and ``AgentOperator``: the ``model`` (a concrete model or a route
  alias of a matching rule) on the task's ``llm_conn_id``;
* ``AgentOperator``: each tool's name; ``ToolOperator``: its tool's name (arguments are checked at run
  time, when their templates are rendered);
* ``ChromaIngestOperator`` / ``ChromaPurgeOperator`` (write) and ``ChromaQueryOperator`` (read): the
  collection.

A value that is still a Jinja template, or a model left to the connection's ``default_model``, cannot be
known when the file is parsed, so it is left to run time. The subject is built from the DAG as parsed:
``dag_id``, ``task_id``, ``owner`` and ``tags`` (all written by the DAG author) and the DAG bundle when the
DAG processor says which it is parsing. A rule that matches on ``bundle`` cannot be evaluated without it;
such rules are given the benefit of the doubt at parse time (never a false import error) and decide at run
time as always.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from governed_ai.core.policy import Decision, PolicyEngine
from governed_ai.core.subject import Subject


@dataclass(frozen=True)
class ParseTimeDenial:
    """One thing a task asks for that the policy does not grant it."""

    task_id: str
    what: str
    reason: str

    def __str__(self) -> str:
        return f"task {self.task_id!r}: {self.what}: {self.reason}"


def _is_template(value: object) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def parse_time_subject(task: Any, bundle: str | None = None) -> Subject:
    """The policy subject of a task as parsed (no run yet)."""
    dag = getattr(task, "dag", None)
    return Subject(
        dag_id=str(getattr(dag, "dag_id", None) or "<no dag>"),
        task_id=str(task.task_id),
        run_id="parse-time",
        owner=str(getattr(task, "owner", None) or "airflow"),
        tags=frozenset(getattr(dag, "tags", None) or ()),
        bundle=bundle,
    )


def _model_decision(engine: PolicyEngine, subject: Subject, connection_id: str, requested: str) -> Decision:
    # The engine expands a route alias to the models it grants; the first is the decision, else the
    # route's (or the requested) model's denial names the rule to change.
    granted = engine.resolve_model(subject, connection_id, requested)
    route = engine.route_for(subject, requested)
    asked = granted[0] if granted else (route.model if route is not None else requested)
    return engine.authorize_model(subject, connection_id, asked)


def _tool_decision(engine: PolicyEngine, subject: Subject, *, name: str) -> Decision:
    # Arguments are rendered at run time: here only whether some rule grants the name.
    return engine.authorize_tool(subject, name, None)


#: What a task asks the policy for, in words, and how the policy decides it for a given subject.
_Request = tuple[str, Callable[[PolicyEngine, Subject], Decision]]


def _requests(task: Any) -> Iterator[_Request]:
    """What a task of this provider will ask the policy for."""
    # Imported here: the policy module is loaded by every DAG processor, the operators only when used.
    from governed_ai.operators.agent import AgentOperator
    from governed_ai.operators.batch import LLMBatchOperator
    from governed_ai.operators.chroma import ChromaIngestOperator, ChromaPurgeOperator, ChromaQueryOperator
    from governed_ai.operators.llm import LLMOperator
    from governed_ai.operators.tool import ToolOperator

    if isinstance(task, LLMOperator | LLMBatchOperator | AgentOperator):
        model, connection = getattr(task, "model", None), task.llm_conn_id
        if isinstance(model, str) and model and not _is_template(model):
            yield (
                f"model {model!r} on connection {connection!r}",
                lambda engine, subject: _model_decision(engine, subject, connection, model),
            )
    tool_names: list[str] = []
    if isinstance(task, AgentOperator):
        tool_names = [tool.name for tool in task.tools]
    elif isinstance(task, ToolOperator):
        tool_names = [task.tool.name]
    for name in tool_names:
        yield f"tool {name!r}", functools.partial(_tool_decision, name=name)
    if isinstance(task, ChromaIngestOperator | ChromaPurgeOperator | ChromaQueryOperator):
        collection = task.collection
        mode: Literal["read", "write"] = "read" if isinstance(task, ChromaQueryOperator) else "write"
        if isinstance(collection, str) and collection and not _is_template(collection):
            yield (
                f"{mode} of collection {collection!r}",
                lambda engine, subject: engine.authorize_collection(subject, collection, mode),
            )


def denials(engine: PolicyEngine, task: Any, bundle: str | None = None) -> list[ParseTimeDenial]:
    """What ``task`` asks for that ``engine`` does not grant it (empty: nothing to object to)."""
    subject = parse_time_subject(task, bundle)
    found: list[ParseTimeDenial] = []
    for what, decide in _requests(task):
        decision = decide(engine, subject)
        if decision.allowed:
            continue
        # With the bundle unknown, a rule matching some bundle may be the one that grants it at run time.
        if bundle is None and any(
            decide(engine, subject.model_copy(update={"bundle": _example_of(pattern)})).allowed
            for pattern in engine.bundle_patterns()
        ):
            continue
        found.append(ParseTimeDenial(subject.task_id, what, decision.reason))
    return found


def _example_of(glob: str) -> str:
    """A bundle name the glob matches (``prod-*`` -> ``prod-``): stands for "some bundle this rule covers"."""
    return re.sub(r"\[!?([^\]])[^\]]*\]", r"\1", glob).replace("*", "").replace("?", "x")


def check_task(task: Any) -> None:
    """Raise Airflow's cluster-policy violation (an import error for the DAG file) when the deployment's
    governance policy does not grant ``task`` what it asks for."""
    from airflow.exceptions import AirflowClusterPolicyViolation

    from governed_ai.hooks.governance import GovernanceHook, governance_conn_for_task

    engine = GovernanceHook(governance_conn_id=governance_conn_for_task(task)).policy_engine()
    problems = denials(engine, task, _parsing_bundle(task))
    if problems:
        raise AirflowClusterPolicyViolation(
            "governed_ai: the governance policy does not grant "
            + "; ".join(str(problem) for problem in problems)
        )


def task_policy(task: Any) -> None:
    """Airflow's ``task_policy`` hook (enable it in ``airflow_local_settings.py``): see :func:`check_task`."""
    check_task(task)


def _parsing_bundle(task: Any) -> str | None:
    dag = getattr(task, "dag", None)
    name = getattr(dag, "bundle_name", None)
    return name if isinstance(name, str) and name else None
