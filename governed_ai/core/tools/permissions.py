"""Which tools a task may use at all, before any arguments are known.

An agent in constrained mode offers its model only these names (in the JSON schema), so the model cannot
even name a tool the policy withholds. The final word is still the per-call decision
(``PolicyEngine.authorize_tool`` with the actual arguments), which also checks argument constraints.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from governed_ai.core.policy import PolicyEngine
from governed_ai.core.subject import Subject


def granted_tool_names(engine: PolicyEngine, subject: Subject, names: Iterable[str]) -> list[str]:
    """The names, in the given order, that some rule matching ``subject`` grants by name.

    Uses the same matching as the engine: the rules ``matching_rules`` reports, and each grant's name as a
    case-sensitive glob. A policy that failed to load grants nothing.
    """
    if engine.load_error is not None:
        return []
    matching = set(engine.matching_rules(subject))
    patterns = [grant.name for rule in engine.document.rules if rule.name in matching for grant in rule.tools]
    return [name for name in names if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]
