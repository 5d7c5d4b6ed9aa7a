"""Running one tool call under governance: authorize, validate, journal, execute, redact, audit.

Order of checks for a call to tool ``name`` with raw ``arguments``:

1. ``name`` is not one of the task's tools -> denied (audited), nothing else looked at;
2. the policy grants no tool of that name to the task -> denied by the policy engine (audited);
3. the arguments do not fit the tool's argument model -> :class:`ToolArgumentsError` (audited);
4. the policy decides on the validated arguments (argument constraints) -> allowed or denied (audited);
5. a side-effecting tool's call is claimed in the replay journal: a call completed by an earlier try is
   replayed from the journal, not executed (audited as ``replayed``); one that an earlier try started but
   never finished is in doubt and is not executed unless the tool is idempotent;
6. the tool runs; its result is made JSON-safe and redacted, journaled, and the call is audited.

A forbidden tool's code is therefore never reached, whatever the model (or text injected into its prompt)
asks for.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, NoReturn

from pydantic import BaseModel
from pydantic_core import PydanticSerializationError, to_jsonable_python

from governed_ai.core.approval import ApprovalGate
from governed_ai.core.audit import AuditRecord, canonical_json
from governed_ai.core.errors import CallInDoubt, GovernanceDenied, GovernedAIError
from governed_ai.core.governor import Governor
from governed_ai.core.journal import ReplayJournal
from governed_ai.core.policy import Decision
from governed_ai.core.policy import RedactionSettings as PolicyRedaction
from governed_ai.core.subject import Subject
from governed_ai.core.tools.calls import ToolCall, ToolOutcome
from governed_ai.core.tools.permissions import granted_tool_names
from governed_ai.core.tools.tool import Tool, ToolArgumentsError
from governed_ai.core.untrusted import mark_untrusted

#: The journal scope tool calls use.
TOOL_JOURNAL_SCOPE = "tool"
_MAX_ERROR_CHARS = 2_000
_MAX_AUDIT_CONTENT = 20_000
#: Longest tool result (as text) sent back to a model; the rest is cut with a note.
MAX_RESULT_CHARS = 8_000
# A tool name a model made up is shown (in audit, transcripts, prompts) at most this long.
MAX_SHOWN_NAME = 80


class ToolDenied(GovernanceDenied):
    """Policy refused a tool call. ``by_arguments``: the tool is granted, but not with these arguments."""

    def __init__(self, message: str, *, tool: str, rule: str | None = None, by_arguments: bool) -> None:
        super().__init__(message, action="tool", resource=tool, rule=rule)
        self.by_arguments = by_arguments


class ToolExecutionError(GovernedAIError):
    """The tool raised (or returned something that is not JSON); the message is redacted. Not permanent:
    the task's retries apply (a side-effecting call that raised is recorded as failed, so it runs again)."""

    permanent = False

    def __init__(self, tool: str, message: str) -> None:
        super().__init__(f"tool {tool!r} failed: {message}")
        self.tool = tool
        self.detail = message


class ToolCallInDoubt(CallInDoubt):
    """An earlier attempt started this side-effecting call and never reported back: it may have happened.

    Not retried automatically (the tool is not declared idempotent). Check whether the effect happened; if
    it did not, mark the journal entry failed (``governed-ai journal fail tool <digest>``) and clear the task
    to run it again.
    """

    def __init__(self, tool: str, key_digest: str, attempts: int) -> None:
        super().__init__(
            f"side-effecting call of tool {tool!r} is in doubt: an earlier attempt started it "
            f"({attempts} claim(s)) but never recorded a result, so it may or may not have taken effect. It "
            f"is not repeated automatically. Check the effect, then mark the journal entry failed to allow "
            f"a new attempt (governed-ai journal fail tool {key_digest}), or declare the tool "
            "idempotent=True if repeating it is harmless."
        )
        self.tool = tool
        self.key_digest = key_digest


@dataclass(frozen=True)
class _CallContext:
    """What every audit record of one authorized call carries."""

    step: str
    key: str
    rule: str | None
    side_effects: bool

    def fields(self) -> dict[str, Any]:
        return {"step": self.step, "key": self.key, "rule": self.rule, "side_effects": self.side_effects}


@dataclass(frozen=True)
class ToolCallResult:
    """A call that returned (or was replayed): its JSON result, redacted as the policy says."""

    tool: str
    result: Any
    replayed: bool
    rule: str | None
    idempotency_key: str
    idempotency_key_sha256: str  # the digest journal and audit carry (keyed when the deployment has a key)
    duration_ms: float
    redactions: int = 0


def arguments_digest(arguments: Any) -> str:
    """sha256 of the canonical JSON of a call's arguments."""
    return hashlib.sha256(canonical_json(arguments).encode("utf-8")).hexdigest()


def idempotency_key(subject: Subject, *, step: str, tool: str, arguments: Any) -> str:
    """The key that identifies one tool call across retries of a task (``try_number`` is not part of it).

    Canonical JSON of ``[dag_id, run_id, task_id, map_index, step, tool, sha256(arguments)]``: unambiguous
    whatever characters the ids contain.
    """
    return canonical_json(
        [
            subject.dag_id,
            subject.run_id,
            subject.task_id,
            subject.map_index,
            step,
            tool,
            arguments_digest(arguments),
        ]
    )


def result_text(result: Any, limit: int = MAX_RESULT_CHARS) -> str:
    """A tool result as text for a model: strings as they are, anything else as JSON; cut at ``limit``."""
    text = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, indent=None)
    if len(text) > limit:
        return f"{text[:limit]}\n[... result cut at {limit} of {len(text)} characters]"
    return text


def policy_arguments(arguments: BaseModel) -> dict[str, Any]:
    """What the policy's argument constraints are checked against: the validated values, JSON-typed.

    Unset optional arguments (None) are left out, so a constraint such as ``type: integer`` applies to a
    value that was given, and an absent optional argument is not counted as an "other" argument.
    """
    dumped: dict[str, Any] = arguments.model_dump(mode="json", exclude_none=True)
    return dumped


class GovernedToolRunner:
    """Runs tool calls for one task (one :class:`Subject`) through the governor.

    :param governor: The governance layer (policy, audit, redaction).
    :param subject: The Airflow task the calls are made for.
    :param tools: The tools this task may try; any other name is denied without consulting the policy.
    :param journal: Replay journal (scope ``"tool"``); required when any tool has side effects.
    """

    def __init__(
        self,
        governor: Governor,
        subject: Subject,
        tools: Iterable[Tool],
        journal: ReplayJournal | None = None,
        *,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.governor = governor
        self.subject = subject
        self.tools = {t.name: t for t in tools}
        self.journal = journal
        self._timer = timer
        self.approvals = ApprovalGate(governor, subject)
        needing_journal = sorted(name for name, t in self.tools.items() if t.side_effects)
        if needing_journal and journal is None:
            raise ValueError(
                f"tools {needing_journal} have side effects and need a replay journal, so that a retried "
                "task replays them instead of repeating them; pass journal=ReplayJournal(engine, 'tool')"
            )

    def call(self, name: str, arguments: Any, *, step: str = "0") -> ToolCallResult:
        """Run one call; raises :class:`ToolDenied`, :class:`ToolArgumentsError`,
        :class:`ToolExecutionError` or :class:`ToolCallInDoubt` (each audited before it is raised)."""
        engine = self.governor.engine()
        redaction = engine.redaction_for(self.subject)
        found = self.tools.get(name)
        if found is None:
            shown = self._shown_name(name)
            reason = (
                f"denied tool {shown!r}: it is not one of this task's tools "
                f"({', '.join(sorted(self.tools)) or 'none'})"
            )
            self._record("tool.authorize", shown, decision="deny", outcome="denied", error=reason, step=step)
            raise ToolDenied(reason, tool=shown, by_arguments=False)
        if not granted_tool_names(engine, self.subject, [name]):
            raw = dict(arguments) if isinstance(arguments, dict) else {}
            self._enforce(engine.authorize_tool(self.subject, name, raw), by_arguments=False)
            raise AssertionError("unreachable: a tool granted by no rule is denied")  # pragma: no cover

        try:
            validated = found.validate(arguments)
        except ToolArgumentsError as error:
            problems, _ = self.governor.redact_text(error.problems[:_MAX_ERROR_CHARS], redaction)
            self._record("tool.call", name, outcome="invalid_arguments", error=problems, step=step)
            raise ToolArgumentsError(name, problems) from None
        decision = self._enforce(
            engine.authorize_tool(self.subject, name, policy_arguments(validated)), by_arguments=True
        )
        if self.approvals.may_need("tool"):  # allowed; the policy may want a human to approve it first
            self.approvals.check("tool", name)
        full_arguments = validated.model_dump(mode="json")
        key = idempotency_key(self.subject, step=step, tool=name, arguments=full_arguments)
        common = _CallContext(step=step, key=key, rule=decision.rule, side_effects=found.side_effects)

        claimed = False
        if found.side_effects:
            assert self.journal is not None  # checked in __init__
            claim = self.journal.begin(
                key,
                reclaim_in_doubt=found.idempotent,
                label=f"tool {name}",
                instance=self.governor.instance_digest(self.subject),
                try_number=self.subject.try_number,
            )
            if claim.status == "completed":
                self._record(
                    "tool.call",
                    name,
                    outcome="replayed",
                    decision="allow",
                    duration_ms=0.0,
                    **common.fields(),
                )
                return ToolCallResult(
                    name, claim.result, True, decision.rule, key, self.governor.digest(key), 0.0
                )
            if claim.status == "in_doubt":
                self._record(
                    "tool.call", name, outcome="in_doubt", decision="allow",
                    error="an earlier attempt started this call and never finished", **common.fields(),
                )  # fmt: skip
                raise ToolCallInDoubt(name, self.governor.digest(key), claim.entry.attempts)
            claimed = True

        started = self._timer()
        try:
            raw_result = found.run(validated)
        except Exception as error:
            self._failed(name, error, started, redaction, claimed, common, what="")
        try:
            jsonable = to_jsonable_python(raw_result)
            canonical_json(jsonable)  # NaN, Infinity, odd keys: fail here, not in the journal or XCom
        except (PydanticSerializationError, TypeError, ValueError) as error:
            self._failed(name, error, started, redaction, claimed, common, what="result is not JSON: ")
        duration = _ms(self._timer() - started)

        redactions = 0
        if redaction.prompts or redaction.outputs:
            jsonable, redactions = self.governor.redact_obj(jsonable, redaction)
        if claimed:
            assert self.journal is not None
            self.journal.complete(key, jsonable)
        content = None
        if redaction.store_content:
            content = canonical_json({"arguments": full_arguments, "result": jsonable})[:_MAX_AUDIT_CONTENT]
            content, _ = self.governor.redact_text(content, redaction)
        self._record(
            "tool.call", name, outcome="ok", decision="allow", duration_ms=duration, content=content,
            redactions=redactions, **common.fields(),
        )  # fmt: skip
        return ToolCallResult(
            name, jsonable, False, decision.rule, key, self.governor.digest(key), duration, redactions
        )

    def attempt(self, call: ToolCall) -> ToolOutcome:
        """Run a call a model asked for, turning denials and failures into outcomes the model is told of.

        :class:`ToolCallInDoubt` is not caught: an effect in an unknown state needs a human, not a model
        that might try again with other arguments.
        """
        shown = call.name if call.name in self.tools else self._shown_name(call.name)
        try:
            done = self.call(call.name, call.arguments, step=call.step)
        except ToolDenied as denied:
            how = " with these arguments" if denied.by_arguments else ""
            return ToolOutcome(
                call=call,
                tool=shown,
                status="denied",
                message=(
                    f"Error: tool {shown!r} is not permitted for this task{how}. It was not run; do not call "
                    "it again."
                ),
                error=str(denied),
                rule=denied.rule,
            )
        except ToolArgumentsError as invalid:
            return ToolOutcome(
                call=call,
                tool=shown,
                status="invalid_arguments",
                message=(
                    f"Error: invalid arguments for tool {shown!r}:\n{invalid.problems}\n"
                    "Call it again with corrected arguments, or give your final answer."
                ),
                error=invalid.problems,
            )
        except ToolExecutionError as failed:
            return ToolOutcome(
                call=call,
                tool=shown,
                status="error",
                message=f"Error: tool {shown!r} failed and did not complete.\n"
                + mark_untrusted(failed.detail, source=f"tool {shown} error"),
                error=failed.detail,
            )
        return ToolOutcome(
            call=call,
            tool=shown,
            status="replayed" if done.replayed else "ok",
            message=f"Result of tool {shown!r}:\n"
            + mark_untrusted(result_text(done.result), source=f"tool {shown}"),
            result=done.result,
            rule=done.rule,
        )

    # -- helpers ---------------------------------------------------------------------------------------

    def _shown_name(self, name: object) -> str:
        redaction = self.governor.engine().redaction_for(self.subject)
        shown, _ = self.governor.redact_text(str(name)[:MAX_SHOWN_NAME], redaction)
        return shown

    def _failed(
        self,
        name: str,
        error: Exception,
        started: float,
        redaction: PolicyRedaction,
        claimed: bool,
        common: _CallContext,
        *,
        what: str,
    ) -> NoReturn:
        duration = _ms(self._timer() - started)
        text = f"{what}{type(error).__name__}: {error}"[:_MAX_ERROR_CHARS]
        message, _ = self.governor.redact_text(text, redaction)
        if claimed:
            # Raised, so taken to have had no effect: the next attempt may run it again.
            assert self.journal is not None
            self.journal.fail(common.key, message)
        self._record(
            "tool.call",
            name,
            outcome="error",
            decision="allow",
            error=message,
            duration_ms=duration,
            **common.fields(),
        )
        raise ToolExecutionError(name, message) from error

    def _enforce(self, decision: Decision, *, by_arguments: bool) -> Decision:
        if not decision.allowed:
            # A denial quotes the offending argument values; they came from a caller (often a model) and
            # may hold secrets, so the reason is redacted before the audit trail and the error see it.
            reason, _ = self.governor.redact_text(decision.reason, decision.redaction)
            decision = replace(decision, reason=reason)
        try:
            return self.governor.enforce(self.subject, decision)
        except GovernanceDenied as denied:
            raise ToolDenied(
                str(denied), tool=denied.resource, rule=denied.rule, by_arguments=by_arguments
            ) from None

    def _record(
        self,
        action: str,
        tool: str,
        *,
        outcome: str,
        step: str,
        decision: str = "n/a",
        rule: str | None = None,
        error: str | None = None,
        key: str | None = None,
        duration_ms: float | None = None,
        side_effects: bool | None = None,
        content: str | None = None,
        redactions: int | None = None,
    ) -> None:
        extra: dict[str, Any] = {"step": step}
        if key is not None:
            extra["idempotency_key_sha256"] = self.governor.digest(key)
        if duration_ms is not None:
            extra["duration_ms"] = duration_ms
        if side_effects is not None:
            extra["side_effects"] = side_effects
        if redactions:
            extra["redactions"] = redactions
        self.governor.record(
            AuditRecord.for_subject(
                self.subject,
                action=action,
                resource=tool,
                decision=decision,
                rule=rule,
                outcome=outcome,
                error=error,
                latency_ms=duration_ms,
                content=content,
                extra=extra,
            )
        )


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
