"""Governance policy: the policy file format, its fail-closed loader and the decision engine.

Typical use::

    provider = PolicyProvider("/opt/airflow/policies/governance_policy.yaml")
    decision = provider.engine().authorize_model(subject, "governed_ai_llm_default", "smollm2")
    if not decision.allowed:
        raise PermissionError(decision.reason)
"""

from __future__ import annotations

from governed_ai.core.policy.document import (
    ApprovalRequirement,
    ArgumentConstraint,
    Budget,
    BudgetSwitch,
    CollectionGrant,
    CustomPattern,
    Defaults,
    ModelGrant,
    ModelRoute,
    PolicyDocument,
    RedactionRule,
    Rule,
    SubjectMatch,
    ToolGrant,
)
from governed_ai.core.policy.engine import (
    STRICTEST_REDACTION,
    Action,
    ApplicableBudget,
    ApprovalAction,
    ApprovalNeed,
    CacheSettings,
    Decision,
    PolicyEngine,
    RedactionSettings,
)
from governed_ai.core.policy.loader import (
    PolicyError,
    PolicyIssue,
    PolicyProvider,
    engine_from_text,
    load_policy_file,
    load_policy_text,
)

__all__ = [
    "STRICTEST_REDACTION",
    "Action",
    "ApplicableBudget",
    "ApprovalAction",
    "ApprovalNeed",
    "ApprovalRequirement",
    "ArgumentConstraint",
    "Budget",
    "BudgetSwitch",
    "CacheSettings",
    "CollectionGrant",
    "CustomPattern",
    "Decision",
    "Defaults",
    "ModelGrant",
    "ModelRoute",
    "PolicyDocument",
    "PolicyEngine",
    "PolicyError",
    "PolicyIssue",
    "PolicyProvider",
    "RedactionRule",
    "RedactionSettings",
    "Rule",
    "SubjectMatch",
    "ToolGrant",
    "engine_from_text",
    "load_policy_file",
    "load_policy_text",
]
