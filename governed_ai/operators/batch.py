"""Operator for batch LLM work: N items x one prompt template -> N governed results, inside one task."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from airflow.providers.common.compat.sdk import AirflowException, AirflowFailException, BaseOperator
from pydantic import BaseModel, ValidationError

from governed_ai.core.audit import AuditRecord
from governed_ai.core.batch import (
    BatchProgress,
    BatchPrompt,
    BatchRun,
    BatchRunner,
    BatchSettings,
    CallSettings,
    make_items,
    parse_rows,
)
from governed_ai.core.batch.processes import auto_processes, run_in_processes
from governed_ai.core.batch.spool import write_lines
from governed_ai.core.budget import DEFAULT_WAIT_SECONDS
from governed_ai.core.client import GovernedClient
from governed_ai.core.errors import InvalidInput
from governed_ai.core.paths import provider_home
from governed_ai.core.structured_output import ensure_schema_model
from governed_ai.core.xcom import ai_xcom, governance_xcom, rows_manifest
from governed_ai.hooks.governance import GovernanceHook
from governed_ai.hooks.llm import LLMHook
from governed_ai.operators.errors import airflow_errors
from governed_ai.operators.lineage import operator_lineage
from governed_ai.operators.storage import is_uri, storage_path
from governed_ai.plugins.links import AuditRecordsLink

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context


class LLMBatchOperator(BaseOperator):
    """Run one prompt template over many items with bounded concurrency, governed, in one task.

    Each item is rendered into the prompt (Jinja, with the item as ``item`` and the DAG's ``params``),
    sent to the model with per-item retries on transient errors (429 honouring Retry-After, 5xx,
    timeouts, malformed bodies), validated into ``output_schema`` with repairs when given, and
    governed like a single call: the policy must grant the model, budgets are reserved (in blocks of
    items) and settled, prompts and replies are redacted, and every call is audited (in batched writes).

    **Replay on retry.** Every completed item is journaled in the governance store before its slot is
    freed, keyed by the task instance (not the try), the item's key, the prompt version, the model and
    the call settings. When Airflow retries the task (after a crash, a kill, or too many failures),
    completed items come from the journal and are not paid for again; at most ``concurrency`` items that
    were in flight when the task died are repeated.

    **Response cache.** When the policy caches the model (a rule's ``cache``), an item whose request is
    unchanged since an earlier run (same model, prompt version, settings and redacted prompt) is answered
    from the governance store for $0 without a call; its row shows ``governance.cache`` ``hit`` and the
    summary counts ``cache_hits``. Only the policy can turn this on.

    **Partial failure.** Items fail one by one with a reason; the batch goes on. The task fails
    (retryably) when more than ``max_failure_rate`` of the items failed or were not run; a budget that
    runs out stops the remaining items and, above the rate, fails the task without retry.

    **Output.** Up to ``max_xcom_items`` items, the XCom value is ``{"results": [...], "failures": [...],
    "summary": {...}, ...}``; above it (or with ``output_path``) results and failures are written as JSONL
    files and XCom holds a manifest with their paths and the summary. Each result row has ``key``,
    ``position``, ``status`` (``ok``/``replayed``/``failed``/``not_run``), and for successes ``content``,
    ``output``, ``usage``, ``cost_usd``, ``latency_ms``, ``attempts``; failures carry ``error``. A ``key``
    appears as given unless the policy's ``output_item_keys`` says otherwise: by default a key in which the
    redactor finds a secret or personal data (an e-mail address as a ticket id) is shown as
    ``digest:<16 hex>``, the digest the audit trail records for that item.

    :param items: The inputs: a list of dicts or strings (e.g. an upstream task's XCom). Templated.
    :param input_path: Alternatively a ``.jsonl``/``.ndjson``/``.json``/``.csv`` file, local or an
        ObjectStoragePath URI (``s3://...``). Templated.
    :param key_field: Field holding each item's unique id (recommended). Without it, the key is a hash
        of the item's content. Keys must be unique: they identify items in the replay journal.
    :param prompt_template: The user message, a Jinja template with ``item`` (and ``params``) in scope,
        e.g. ``"Classify this ticket: {{ item.text }}"``. Not rendered by Airflow (it would not know
        ``item``); its hash is the recorded prompt version.
    :param system_prompt: Optional system message; a Jinja template like ``prompt_template``.
    :param model: Model name; defaults to the connection's ``default_model``. Templated.
    :param temperature: Sampling temperature; None keeps the endpoint's default.
    :param max_tokens: Upper bound on reply tokens per call (the policy may cap it further).
    :param output_schema: A pydantic model class; replies are validated into it, with repairs.
    :param max_repair_attempts: Repair attempts per item after an invalid structured reply.
    :param concurrency: Calls in flight at once for the task (default 8), shared out among its processes:
        the endpoint sees this many requests at a time however many processes run them.
    :param processes: Run the batch in this many processes (forked from the task's), or ``"auto"`` (the
        default): one per core the worker gives the task, as far as the batch has 250 items and
        ``concurrency`` 32 calls in flight per process; 1 for smaller or less concurrent batches (they
        wait on the endpoint, not on a core, and a second process only adds CPU). Governance costs
        CPU per call, and one process runs on one core: when a batch is CPU-bound (hundreds of calls per
        second), processes multiply its throughput. All of them govern the same task instance: one
        policy, one budget ledger, one replay journal and one audit chain; rate limits and
        ``concurrency`` are shared out; results come back in item order. Uses ``fork`` (Linux/macOS).
        Tested under LocalExecutor and ``dag.test()``; inside a Celery worker one run failed and the
        cause is not yet known, so where the deployment's ``[core] executor`` names Celery, ``"auto"``
        means 1 (an explicit number is still obeyed).
    :param requests_per_minute: Client-side request rate limit (None: unlimited).
    :param tokens_per_minute: Client-side token rate limit, on estimated tokens (None: unlimited).
    :param max_retries: Retries of one request on transient errors (429 honouring Retry-After, 5xx,
        timeouts, malformed bodies); default: the connection's ``max_retries``.
    :param deadline_seconds: One request's time limit over all its retries; default: the connection's.
    :param max_failure_rate: Fail the task when more than this fraction of items failed (default 0.05).
    :param output_path: Write results (JSONL) here, plus ``<name>.failures.jsonl`` beside it. Templated.
    :param max_xcom_items: Above this many items, results go to a file even without ``output_path``
        (under ``$AIRFLOW_HOME/governed_ai/outputs/batch/``): XCom is not a data store.
    :param progress_interval_seconds: How often progress is logged (items, failures, rate, tokens, cost).
    :param budget_block_size: Items whose worst-case cost is reserved per budget transaction (default:
        twice ``concurrency``, at least 16 and at most 256). Larger blocks mean fewer ledger transactions;
        near a budget's limit a block shrinks to what fits, down to one item.
    :param budget_wait_seconds: How long an item may wait for budget held by calls still in flight (this
        task's or another's) to be settled or to expire before the batch concludes the budget is
        exhausted (default 600 s, the default reservation TTL). Progress is logged while it waits.
    :param on_budget_exhausted: What a budget stop means for the task: ``"fail"`` (default: fail without
        retry, naming the budget) or ``"succeed"`` (succeed with the partial result; the items not run are
        listed with the reason, for jobs that resume in the next budget period, see ``BudgetSensor``).
    :param prompt_name: Optional declared prompt name (recorded as ``name@label#hash``).
    :param prompt_version_label: Optional declared prompt version (requires ``prompt_name``).
    :param llm_conn_id: Connection of type ``governed_ai_llm``.
    :param governance_conn_id: Connection of type ``governed_ai_governance`` (optional; default
        ``governed_ai_governance_default``). Only connections the deployment lists in ``[governed_ai]
        allowed_governance_conn_ids`` may be named; any other fails the task before any call.
    """

    operator_extra_links = (AuditRecordsLink(),)

    template_fields: Sequence[str] = ("items", "input_path", "model", "output_path")
    template_fields_renderers = {"items": "json"}
    ui_color = "#e8f0fe"

    def __init__(
        self,
        *,
        prompt_template: str,
        items: list[Any] | None = None,
        input_path: str | None = None,
        key_field: str | None = None,
        system_prompt: str | None = None,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        output_schema: type[BaseModel] | None = None,
        max_repair_attempts: int = 2,
        concurrency: int = 8,
        processes: int | Literal["auto"] = "auto",
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        max_retries: int | None = None,
        deadline_seconds: float | None = None,
        max_failure_rate: float = 0.05,
        output_path: str | None = None,
        max_xcom_items: int = 100,
        progress_interval_seconds: float = 10.0,
        budget_block_size: int | None = None,
        budget_wait_seconds: float = DEFAULT_WAIT_SECONDS,
        on_budget_exhausted: Literal["fail", "succeed"] = "fail",
        prompt_name: str | None = None,
        prompt_version_label: str | None = None,
        llm_conn_id: str = LLMHook.default_conn_name,
        governance_conn_id: str = GovernanceHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if items is None and input_path is None:
            raise ValueError(
                f"{self.task_id}: give 'items' (a list) or 'input_path' (a JSONL/JSON/CSV file)."
            )
        if processes != "auto" and (not isinstance(processes, int) or not 1 <= processes <= 64):
            raise ValueError(f"{self.task_id}: 'processes' must be 1..64 or 'auto', got {processes!r}.")
        self.processes = processes
        if not 0.0 <= max_failure_rate <= 1.0:
            raise ValueError(
                f"{self.task_id}: 'max_failure_rate' is a fraction in 0..1, got {max_failure_rate}."
            )
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"{self.task_id}: 'max_tokens' must be a positive integer, got {max_tokens}.")
        if max_xcom_items < 0:
            raise ValueError(f"{self.task_id}: 'max_xcom_items' must be 0 or more.")
        try:
            self.settings = BatchSettings(
                concurrency=concurrency, progress_interval_seconds=progress_interval_seconds
            )
            self.prompt = BatchPrompt(
                prompt_template, system_prompt, name=prompt_name, version=prompt_version_label
            )
        except (ValidationError, ValueError) as error:
            raise ValueError(f"{self.task_id}: {error}") from None
        self.items = items
        self.input_path = input_path
        self.key_field = key_field
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.output_schema = ensure_schema_model(output_schema, "output_schema")
        self.max_repair_attempts = max_repair_attempts
        self.max_failure_rate = max_failure_rate
        self.output_path = output_path
        self.max_xcom_items = max_xcom_items
        if budget_block_size is None:
            budget_block_size = min(256, max(16, 2 * concurrency))
        if not 1 <= budget_block_size <= 1000:
            raise ValueError(f"{self.task_id}: 'budget_block_size' must be 1..1000, got {budget_block_size}.")
        if max_retries is not None and not 0 <= max_retries <= 20:
            raise ValueError(f"{self.task_id}: 'max_retries' must be 0..20, got {max_retries}.")
        if deadline_seconds is not None and deadline_seconds <= 0:
            raise ValueError(f"{self.task_id}: 'deadline_seconds' must be positive, got {deadline_seconds}.")
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        if on_budget_exhausted not in ("fail", "succeed"):
            raise ValueError(
                f"{self.task_id}: 'on_budget_exhausted' must be 'fail' or 'succeed', "
                f"got {on_budget_exhausted!r}."
            )
        if budget_wait_seconds < 0:
            raise ValueError(f"{self.task_id}: 'budget_wait_seconds' must be 0 or more.")
        self.budget_block_size = budget_block_size
        self.budget_wait_seconds = budget_wait_seconds
        self.on_budget_exhausted = on_budget_exhausted
        self.max_retries = max_retries
        self.deadline_seconds = deadline_seconds
        self.llm_conn_id = llm_conn_id
        self.governance_conn_id = governance_conn_id

    @cached_property
    def hook(self) -> LLMHook:
        return LLMHook(llm_conn_id=self.llm_conn_id)

    @cached_property
    def governance(self) -> GovernanceHook:
        with airflow_errors(self.task_id):  # a governance connection the deployment does not allow
            return GovernanceHook(governance_conn_id=self.governance_conn_id)

    # -- inputs -------------------------------------------------------------------------------------

    def load_rows(self) -> list[Any]:
        if self.items is not None:
            rows = self.items
            if isinstance(rows, str):  # a template rendered to JSON text
                try:
                    rows = json.loads(rows)
                except json.JSONDecodeError:
                    raise InvalidInput(
                        f"{self.task_id}: 'items' rendered to text that is not a JSON list."
                    ) from None
            if not isinstance(rows, list | tuple):
                raise InvalidInput(f"{self.task_id}: 'items' must be a list, got {type(rows).__name__}.")
            return list(rows)
        given = str(self.input_path)
        path = storage_path(given)
        if not path.exists():
            raise FileNotFoundError(f"{self.task_id}: 'input_path' {given!r} does not exist.")
        return parse_rows(path.read_text(encoding="utf-8"), given)

    # -- run ----------------------------------------------------------------------------------------

    def execute(self, context: Context) -> dict[str, Any]:
        with airflow_errors(self.task_id):
            items = make_items(self.load_rows(), self.key_field)
            if not items:
                raise InvalidInput(f"{self.task_id}: the batch is empty; nothing to do.")
            prompt = self.prompt.with_globals(params=dict(context.get("params") or {}))
            with self.governance.governed_client(
                context,
                llm_conn_id=self.llm_conn_id,
                budget_block_size=self.budget_block_size,
                requests_per_minute=self.requests_per_minute,
                tokens_per_minute=self.tokens_per_minute,
                max_retries=self.max_retries,
                deadline_seconds=self.deadline_seconds,
                budget_wait_seconds=self.budget_wait_seconds,
                on_wait=self.log.info,
            ) as client:
                requested = client.resolve_requested(self.model)
                call = CallSettings(
                    model=requested,
                    temperature=self.temperature,
                    max_tokens=self.max_tokens,
                    output_schema=self.output_schema,
                    max_repair_attempts=self.max_repair_attempts,
                )
                self.log.info(
                    "Batch of %d items, model %s, %s, concurrency %d",
                    len(items),
                    requested,
                    prompt.description,
                    self.settings.concurrency,
                )
                spool_directory = self._spool_directory(context, len(items))

                def make_runner(for_client: GovernedClient) -> BatchRunner:
                    return BatchRunner(
                        for_client,
                        call,
                        prompt,
                        self.settings,
                        on_progress=self._log_progress,
                        spool_directory=spool_directory,
                    )

                processes = self._processes(len(items))
                with _quiet_http_logs():
                    if processes > 1:
                        self.log.info(
                            "Running the batch in %d processes, %d calls in flight between them",
                            processes, self.settings.concurrency,
                        )  # fmt: skip
                        governor = client.governor
                        run = run_in_processes(
                            items,
                            processes=processes,
                            make_client=lambda: client.share(processes),
                            make_runner=make_runner,
                            engines=[governor.audit.engine, governor.ledger.engine],
                            on_progress=self._log_progress,
                            progress_interval_seconds=self.settings.progress_interval_seconds,
                        )
                    else:
                        run = client.run(make_runner(client).run(items))
                model = run.model or requested
                if run.cache is not None:
                    self.log.info(
                        "Response cache: %d item(s) answered from it (nothing paid), %d paid and stored",
                        run.cache_hits, run.cache_misses,
                    )  # fmt: skip
                client.writer.write_sync(
                    records=[
                        AuditRecord.for_subject(
                            client.subject,
                            action="batch.summary",
                            resource=f"{self.llm_conn_id}/{model}",
                            decision="n/a",
                            model=model,
                            prompt_version=prompt.version_id,
                            outcome="ok" if not run.progress.failed + run.progress.not_run else "partial",
                            extra=run.summary(),
                        )
                    ]
                )
        try:
            payload = self._publish(run, model, context)
        finally:
            run.discard()
        self._lineage_facts = {
            "model": model,
            "summary": run.summary(),
            "results_path": payload.get("results_path"),
        }
        self._apply_failure_policy(run)
        return payload

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        facts = getattr(self, "_lineage_facts", None)
        if facts is None:
            return None
        summary = facts["summary"]

        def build(ol: Any, _: Any) -> tuple[list[Any], list[Any], Any]:
            inputs = [ol.model_input(self.hook.settings.base_url, facts["model"])]
            if self.input_path:
                inputs.append(ol.file_input(str(self.input_path)))
            outputs = [ol.file_output(facts["results_path"])] if facts["results_path"] else []
            facet = ol.GovernedAIRunFacet(
                operation="batch_chat",
                model=facts["model"],
                promptVersion=self.prompt.version_id,
                calls=summary["ok"] + summary["failed"],
                promptTokens=summary["prompt_tokens"],
                completionTokens=summary["completion_tokens"],
                costUsd=summary["cost_usd"],
                policyDecision="allow",
                details={
                    key: summary[key]
                    for key in ("total", "ok", "replayed", "failed", "not_run", "tokens", "cache_hits")
                    if key in summary
                },
            )
            return inputs, outputs, facet

        return operator_lineage(build)

    def _log_progress(self, progress: BatchProgress) -> None:
        self.log.info("%s", progress.line())

    def _xcom_base(self, run: BatchRun, model: str) -> dict[str, Any]:
        """The AI operators' common XCom core, for the batch as a whole."""
        summary = run.summary()
        return ai_xcom(
            model=model,
            prompt_tokens=summary["prompt_tokens"],
            completion_tokens=summary["completion_tokens"],
            cost_usd=summary["cost_usd"],
            latency_ms=summary["seconds"] * 1000,
            governance=governance_xcom(
                rule=run.rule,
                prompt_version=self.prompt.version_id,
                redactions=run.redactions,
                fallbacks_tried=list(run.fallbacks_tried),
                cache=run.cache,
            ),
            summary=summary,
            prompt_version=self.prompt.version_id,
        )

    def _publish(self, run: BatchRun, model: str, context: Context) -> dict[str, Any]:
        """Results and failures in item order: in XCom when few, else streamed from the spool to files."""
        base = self._xcom_base(run, model)
        total = run.progress.total
        if self.output_path is None and total <= self.max_xcom_items:
            rows = [json.loads(line) for line in run.rows()]
            failures = [json.loads(line) for line in run.rows(failures_only=True)]
            return {**base, "results": rows, "failures": failures}
        if self.output_path and is_uri(str(self.output_path)):
            remote = storage_path(str(self.output_path))
            remote_failures = remote.with_name(remote.stem + ".failures.jsonl")
            # Streamed: an object store uploads in parts and shows the object only once it is complete.
            with remote.open("wb") as out:
                rows_written = write_lines(run.rows(), out)
            with remote_failures.open("wb") as out:
                failures_written = write_lines(run.rows(failures_only=True), out)
            self.log.info("Wrote %d results to %s and %d failures", rows_written, remote, failures_written)
            return {**base, **rows_manifest(str(remote), str(remote_failures), rows=rows_written,
                                            failed_rows=failures_written)}  # fmt: skip
        path = self._local_output(context)
        failures_path = path.with_name(path.stem + ".failures.jsonl")
        written: dict[Path, int] = {}
        for target, only_failures in ((path, False), (failures_path, True)):
            tmp = target.with_name(target.name + ".tmp")
            with tmp.open("wb") as out:
                written[target] = write_lines(run.rows(failures_only=only_failures), out)
            tmp.replace(target)  # readers never see a half-written file
        self.log.info(
            "Wrote %d results to %s and %d failures to %s",
            written[path], path, written[failures_path], failures_path,
        )  # fmt: skip
        return {
            **base,
            **rows_manifest(
                str(path), str(failures_path), rows=written[path], failed_rows=written[failures_path]
            ),
        }

    def _processes(self, items: int) -> int:
        """How many processes run this batch: never more than items or calls in flight."""
        concurrency = self.settings.concurrency
        if self.processes != "auto":
            return max(1, min(int(self.processes), items, concurrency))
        if _executor_names_celery():
            return 1
        return auto_processes(items, concurrency)

    def _spool_directory(self, context: Context, total: int) -> str | None:
        """Outcomes are spooled beside a local results file (publishing is then a local copy); else in the
        system temp directory."""
        if self.output_path is None and total <= self.max_xcom_items:
            return None
        if self.output_path and is_uri(str(self.output_path)):
            return None
        return str(self._local_output(context).parent)

    def _local_output(self, context: Context) -> Path:
        path = Path(self.output_path) if self.output_path else self._default_output(context)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _default_output(self, context: Context) -> Path:
        ti = context["ti"]
        run_id = str(ti.run_id).replace(":", "_").replace("+", "_")
        suffix = "" if getattr(ti, "map_index", -1) in (-1, None) else f".{ti.map_index}"
        return provider_home() / "outputs" / "batch" / ti.dag_id / run_id / f"{ti.task_id}{suffix}.jsonl"

    def _apply_failure_policy(self, run: BatchRun) -> None:
        total = run.progress.total
        resume_later = run.stopped_by_budget and self.on_budget_exhausted == "succeed"
        if resume_later:
            # The items not run wait for the next budget period; only real failures count against the rate.
            self.log.warning(
                "stopped by budget with %d item(s) not run; succeeding (on_budget_exhausted='succeed'): %s",
                run.progress.not_run,
                run.stopped,
            )
        bad = run.progress.failed + (0 if resume_later else run.progress.not_run)
        if not bad or bad / total <= self.max_failure_rate:
            if bad:
                self.log.warning(
                    "%d of %d items failed (within max_failure_rate %.2f)", bad, total, self.max_failure_rate
                )
            return
        rate = f"{bad} of {total} items failed or were not run ({bad / total:.1%} > max_failure_rate " + (
            f"{self.max_failure_rate:.1%})"
        )
        if run.stopped and not resume_later:
            # A denial or an exhausted budget: a retry now would be refused the same way.
            what = "stopped by budget" if run.stopped_by_budget else "denied by governance"
            raise AirflowFailException(f"{self.task_id}: {what}: {run.stopped}. {rate}.")
        examples = "; ".join(f"{o.key}: {(o.error or '')[:300]}" for o in run.failure_examples)
        # Retryable: a retry replays the completed items from the journal and tries only the rest.
        raise AirflowException(f"{self.task_id}: {rate}. Examples: {examples}")


@contextmanager
def _quiet_http_logs() -> Iterator[None]:
    """The HTTP clients log one INFO line per request: 1,000 lines for 1,000 items drown the progress."""
    loggers = [logging.getLogger(name) for name in ("httpx", "httpx2", "openai")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _executor_names_celery() -> bool:
    """Whether the deployment's ``[core] executor`` names Celery (``processes="auto"`` then means 1)."""
    from airflow.providers.common.compat.sdk import conf

    return "celery" in (conf.get("core", "executor", fallback="") or "").lower()
