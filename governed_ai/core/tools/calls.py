"""A tool call requested by a model, and what came of it, as the agent loop sees them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

#: ok: ran; replayed: result taken from the replay journal; denied: policy refused it; invalid_arguments:
#: the arguments did not fit the tool's model; error: the tool raised; skipped: not run (a limit was reached).
ToolCallStatus = Literal["ok", "replayed", "denied", "invalid_arguments", "error", "skipped"]


@dataclass(frozen=True)
class ToolCall:
    """One call a model asked for. ``arguments`` is whatever the model sent (normally a JSON object).

    ``step`` is the call's position in the agent run (``"2"``, or ``"2.1"`` for the second of several calls
    in one native reply); it is part of the idempotency key, so a retried run that makes the same call at the
    same point replays it.
    """

    name: str
    arguments: Any
    step: str
    call_id: str | None = None


@dataclass(frozen=True)
class ToolOutcome:
    """What happened to a :class:`ToolCall`.

    ``tool`` is the tool's name as safe to show (a name the model made up is redacted and shortened);
    ``message`` is the text sent back to the model (results and tool errors wrapped as untrusted data);
    ``result`` the JSON result (redacted as the policy says); ``error`` a short, redacted description for
    transcripts and logs.
    """

    call: ToolCall
    tool: str
    status: ToolCallStatus
    message: str
    result: Any = None
    error: str | None = None
    rule: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.status in ("ok", "replayed")
