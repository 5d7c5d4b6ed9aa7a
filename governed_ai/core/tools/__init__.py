"""Governed tools and agents, without Airflow.

- :func:`tool` / :class:`Tool`: a typed callable with a pydantic argument model; :class:`ToolRegistry` and
  the process-wide :data:`default_registry`; :func:`hook_method_tool` for whitelisted hook methods.
- :class:`GovernedToolRunner`: one call, authorized, validated, journaled (side effects), redacted, audited.
- :class:`AgentLoop` (sans-IO) and :class:`GovernedAgent` (its governed sync driver): a bounded agent that
  chooses tools either natively (OpenAI ``tools=``) or through a JSON schema listing only permitted tools.
"""

from __future__ import annotations

from governed_ai.core.tools.agent import (
    AgentLimits,
    AgentLoop,
    AgentResult,
    AgentStepRecord,
    ModelTurn,
    ToolTurn,
)
from governed_ai.core.tools.agent_runner import GovernedAgent
from governed_ai.core.tools.calls import ToolCall, ToolOutcome
from governed_ai.core.tools.choice import ToolChoiceMode, constrained_step_model, schema_tool_names
from governed_ai.core.tools.hook_tools import hook_method_tool
from governed_ai.core.tools.native import NativeToolChat, ToolChatRequest
from governed_ai.core.tools.permissions import granted_tool_names
from governed_ai.core.tools.registry import (
    DuplicateToolError,
    ToolRegistry,
    UnknownToolError,
    default_registry,
)
from governed_ai.core.tools.runner import (
    TOOL_JOURNAL_SCOPE,
    GovernedToolRunner,
    ToolCallInDoubt,
    ToolCallResult,
    ToolDenied,
    ToolExecutionError,
    idempotency_key,
)
from governed_ai.core.tools.tool import FINAL_CHOICE, Tool, ToolArgumentsError, ToolDefinitionError, tool

__all__ = [
    "FINAL_CHOICE",
    "TOOL_JOURNAL_SCOPE",
    "AgentLimits",
    "AgentLoop",
    "AgentResult",
    "AgentStepRecord",
    "DuplicateToolError",
    "GovernedAgent",
    "GovernedToolRunner",
    "ModelTurn",
    "NativeToolChat",
    "Tool",
    "ToolArgumentsError",
    "ToolCall",
    "ToolCallInDoubt",
    "ToolCallResult",
    "ToolChatRequest",
    "ToolChoiceMode",
    "ToolDefinitionError",
    "ToolDenied",
    "ToolExecutionError",
    "ToolOutcome",
    "ToolRegistry",
    "ToolTurn",
    "UnknownToolError",
    "constrained_step_model",
    "default_registry",
    "granted_tool_names",
    "hook_method_tool",
    "idempotency_key",
    "schema_tool_names",
    "tool",
]
