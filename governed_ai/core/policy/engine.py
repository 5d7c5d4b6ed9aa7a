"""Policy decisions: may this task use this model, tool or collection, and which budgets and redaction apply.

Everything a decision needs is compiled once when the engine is built (globs to regexes, argument
constraints to checkers), and the rules that match a task are cached per task identity, so a decision is a
few dictionary lookups and pattern matches.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

from governed_ai.core.policy.document import (
    OUTPUT_ITEM_KEYS_ORDER,
    ApprovalRequirement,
    ArgumentConstraint,
    Budget,
    CustomPattern,
    Defaults,
    ModelRoute,
    OutputItemKeys,
    PolicyDocument,
    Rule,
    SubjectMatch,
)
from governed_ai.core.subject import Subject

Action = Literal["model", "tool", "collection.read", "collection.write"]
#: What a ``require_approval`` entry can be about.
ApprovalAction = Literal["model", "tool", "collection.write"]

# Bounds on the memo tables, so a long-lived process with many distinct tasks cannot grow without limit.
_MAX_CACHED_SUBJECTS = 4096
_MAX_CACHED_DECISIONS_PER_SUBJECT = 256


@dataclass(frozen=True, slots=True)
class RedactionSettings:
    """The redaction that applies to one task: policy defaults tightened by every matching rule."""

    prompts: bool = True
    outputs: bool = True
    store_content: bool = False
    custom_patterns: tuple[CustomPattern, ...] = ()
    #: How batch item keys appear in the task's own outputs (see the policy document's ``output_item_keys``).
    output_item_keys: OutputItemKeys = "redacted"


# What a task gets when nothing is known about it (e.g. the policy failed to load): the strictest settings.
STRICTEST_REDACTION = RedactionSettings(output_item_keys="digest")


def _strictest_item_keys(*settings: OutputItemKeys | None) -> OutputItemKeys:
    return max((s for s in settings if s is not None), key=OUTPUT_ITEM_KEYS_ORDER.index)


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one authorization question, with enough context to audit and to fix a denial."""

    allowed: bool
    action: Action
    resource: str
    rule: str | None
    reason: str
    redaction: RedactionSettings
    max_tokens_per_call: int | None = None
    policy_digest: str = ""
    max_input_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """The response cache that applies to one task's requests for one model (the policy's ``cache``)."""

    rule: str
    ttl_seconds: int
    #: ``structured``: only requests with an output schema; ``all``: every chat reply.
    outputs: Literal["structured", "all"]


@dataclass(frozen=True, slots=True)
class ApprovalNeed:
    """A policy's answer that an allowed action must first be approved by a human, and by whom."""

    action: ApprovalAction
    resource: str
    rule: str
    approvers: tuple[str, ...]
    timeout_minutes: int
    #: The entry's ``estimated_cost_above_usd`` when the need comes from a cost threshold.
    cost_threshold_usd: float | None = None


@dataclass(frozen=True, slots=True)
class ApplicableBudget:
    """A budget that applies to a task, resolved to the concrete ledger period it charges right now."""

    name: str
    scope: Literal["dag", "team", "global"]
    period: Literal["run", "day", "month"]
    period_key: str
    resets_at: datetime | None
    max_tokens: int | None
    max_cost_usd: float | None

    @property
    def ledger_key(self) -> tuple[str, str]:
        """The key the budget ledger accounts usage under: ``(budget name, period key)``."""
        return (self.name, self.period_key)


class _GlobSet:
    """A set of fnmatch globs compiled for fast matching; literal names skip the regex entirely."""

    __slots__ = ("_exact", "_regex")

    def __init__(self, patterns: list[str]) -> None:
        literal = [p for p in patterns if not any(c in p for c in "*?[")]
        wildcard = [p for p in patterns if p not in literal]
        self._exact = frozenset(literal)
        self._regex = re.compile("|".join(fnmatch.translate(p) for p in wildcard)) if wildcard else None

    def matches(self, value: str) -> bool:
        return value in self._exact or (self._regex is not None and self._regex.match(value) is not None)


class _SubjectMatcher:
    __slots__ = ("_bundle", "_dag_id", "_owner", "_tags", "_task_id")

    def __init__(self, match: SubjectMatch | None) -> None:
        def compiled(patterns: list[str] | None) -> _GlobSet | None:
            return _GlobSet(patterns) if patterns is not None else None

        self._dag_id = compiled(match.dag_id if match else None)
        self._task_id = compiled(match.task_id if match else None)
        self._owner = compiled(match.owner if match else None)
        self._tags = compiled(match.tags if match else None)
        self._bundle = compiled(match.bundle if match else None)

    def matches(self, subject: Subject) -> bool:
        if self._dag_id is not None and not self._dag_id.matches(subject.dag_id):
            return False
        if self._task_id is not None and not self._task_id.matches(subject.task_id):
            return False
        if self._owner is not None and not self._owner.matches(subject.owner):
            return False
        if self._bundle is not None and (subject.bundle is None or not self._bundle.matches(subject.bundle)):
            return False
        tags = self._tags
        return tags is None or any(tags.matches(tag) for tag in subject.tags)


def _type_name(value: object) -> str:
    return type(value).__name__


def _is_number(value: object) -> bool:
    # bool is an int subclass, but True is not a number a range was written for.
    return isinstance(value, int | float) and not isinstance(value, bool)


class _ArgumentCheck:
    """One argument's constraints, compiled; ``violation`` returns why a value fails, or None."""

    __slots__ = ("_c", "_enum", "_regex")

    def __init__(self, constraint: ArgumentConstraint) -> None:
        self._c = constraint
        self._regex = re.compile(constraint.regex) if constraint.regex is not None else None
        # Compare with the type so that True never equals 1 and "1" never equals 1.
        self._enum = (
            frozenset(
                (bool if isinstance(v, bool) else float if _is_number(v) else str, v) for v in constraint.enum
            )
            if constraint.enum is not None
            else None
        )

    def violation(self, value: object) -> str | None:
        c = self._c
        if c.type is not None:
            ok = {
                "string": isinstance(value, str),
                "integer": isinstance(value, int) and not isinstance(value, bool),
                "number": _is_number(value),
                "boolean": isinstance(value, bool),
            }[c.type]
            if not ok:
                return f"must be of type {c.type}, got {_type_name(value)}"
        if self._enum is not None:
            kind = bool if isinstance(value, bool) else float if _is_number(value) else str
            if not isinstance(value, bool | int | float | str) or (kind, value) not in self._enum:
                return f"must be one of {c.enum!r} (exact, case-sensitive), got {value!r}"
        if self._regex is not None or c.min_length is not None or c.max_length is not None:
            if not isinstance(value, str):
                return f"must be a string, got {_type_name(value)}"
            if c.max_length is not None and len(value) > c.max_length:
                return f"must be at most {c.max_length} characters, got {len(value)}"
            if c.min_length is not None and len(value) < c.min_length:
                return f"must be at least {c.min_length} characters, got {len(value)}"
            if self._regex is not None and self._regex.fullmatch(value) is None:
                return f"must fully match regex {c.regex!r}, got {value!r}"
        if c.min is not None or c.max is not None:
            if not _is_number(value):
                return f"must be a number, got {_type_name(value)}"
            assert isinstance(value, int | float)
            if isinstance(value, float) and math.isnan(value):
                return "must be a number within range, got NaN"
            if c.min is not None and value < c.min:
                return f"must be >= {c.min}, got {value!r}"
            if c.max is not None and value > c.max:
                return f"must be <= {c.max}, got {value!r}"
        return None


@dataclass(frozen=True, slots=True)
class _CompiledModelGrant:
    connection: _GlobSet
    model: _GlobSet
    max_tokens_per_call: int | None
    max_input_tokens: int | None


@dataclass(frozen=True, slots=True)
class _CompiledToolGrant:
    name: _GlobSet
    checks: dict[str, _ArgumentCheck]
    required: frozenset[str]
    allow_other_args: bool


@dataclass(frozen=True, slots=True)
class _CompiledCollectionGrant:
    name: _GlobSet
    read: bool
    write: bool


@dataclass(frozen=True, slots=True)
class _CompiledApproval:
    rule: str
    requirement: ApprovalRequirement
    action: ApprovalAction
    names: _GlobSet | None  # None: any name (a cost threshold on every model)

    @classmethod
    def compile(cls, rule: str, requirement: ApprovalRequirement) -> _CompiledApproval:
        action: ApprovalAction
        names: list[str] | None
        if requirement.tools is not None:
            action, names = "tool", requirement.tools
        elif requirement.collection_writes is not None:
            action, names = "collection.write", requirement.collection_writes
        else:
            action, names = "model", requirement.models
        return cls(rule, requirement, action, _GlobSet(names) if names is not None else None)

    def applies(self, action: ApprovalAction, name: str, estimated_cost_usd: float | None) -> bool:
        if action != self.action or (self.names is not None and not self.names.matches(name)):
            return False
        threshold = self.requirement.estimated_cost_above_usd
        # An unknown cost (a model without a price) cannot be shown to stay under the threshold.
        return threshold is None or estimated_cost_usd is None or estimated_cost_usd > threshold


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    rule: Rule
    matcher: _SubjectMatcher
    models: tuple[_CompiledModelGrant, ...]
    tools: tuple[_CompiledToolGrant, ...]
    collections: tuple[_CompiledCollectionGrant, ...]
    cache_models: _GlobSet | None = None
    approvals: tuple[_CompiledApproval, ...] = ()

    @classmethod
    def compile(cls, rule: Rule) -> _CompiledRule:
        return cls(
            rule=rule,
            cache_models=_GlobSet(rule.cache.models) if rule.cache is not None else None,
            matcher=_SubjectMatcher(rule.match),
            models=tuple(
                _CompiledModelGrant(
                    _GlobSet([g.connection]), _GlobSet([g.model]), g.max_tokens_per_call, g.max_input_tokens
                )
                for g in rule.models
            ),
            tools=tuple(
                _CompiledToolGrant(
                    name=_GlobSet([g.name]),
                    checks={arg: _ArgumentCheck(c) for arg, c in g.args.items()},
                    required=frozenset(arg for arg, c in g.args.items() if c.required),
                    allow_other_args=g.allow_other_args,
                )
                for g in rule.tools
            ),
            collections=tuple(
                _CompiledCollectionGrant(_GlobSet([g.name]), g.read, g.write) for g in rule.collections
            ),
            approvals=tuple(_CompiledApproval.compile(rule.name, r) for r in rule.require_approval),
        )


@dataclass(slots=True)
class _SubjectView:
    """Everything about one task identity that does not depend on the request."""

    rules: tuple[_CompiledRule, ...]
    redaction: RedactionSettings
    budgets: tuple[Budget, ...]
    decisions: dict[tuple[str, str, str], Decision] = field(default_factory=dict)
    caches: dict[tuple[str, str], CacheSettings | None] = field(default_factory=dict)
    approvals: tuple[_CompiledApproval, ...] = ()


def _describe(subject: Subject) -> str:
    tags = ", ".join(sorted(subject.tags))
    bundle = "" if subject.bundle is None else f", bundle {subject.bundle!r}"
    return f"dag {subject.dag_id!r} task {subject.task_id!r} (owner {subject.owner!r}, tags [{tags}]{bundle})"


def _period(budget: Budget, subject: Subject, now: datetime) -> tuple[str, datetime | None]:
    if budget.period == "run":
        return subject.run_id, None
    if budget.period == "day":
        start = datetime(now.year, now.month, now.day, tzinfo=UTC)
        return start.strftime("%Y-%m-%d"), start + timedelta(days=1)
    next_month = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
    return f"{now.year:04d}-{now.month:02d}", next_month


class PolicyEngine:
    """Answers authorization questions for one loaded policy document. Thread-safe for reads.

    Build one per loaded document (``PolicyProvider`` does this on every reload); an engine built with
    ``load_error`` denies everything and quotes the error.
    """

    def __init__(
        self,
        document: PolicyDocument,
        *,
        source: str = "<inline policy>",
        digest: str = "",
        load_error: str | None = None,
    ) -> None:
        self.document = document
        self.source = source
        self.digest = digest
        self.load_error = load_error
        self._rules = tuple(_CompiledRule.compile(rule) for rule in document.rules)
        self._budget_matchers = tuple((b, _SubjectMatcher(b.match)) for b in document.budgets)
        self._unpriced_allowed = {
            b.name: _GlobSet(b.allow_unpriced_models) for b in document.budgets if b.allow_unpriced_models
        }
        self._subjects: dict[tuple[str, str, str, frozenset[str], str | None], _SubjectView] = {}

    @classmethod
    def deny_all(cls, error: str, *, source: str = "<inline policy>") -> PolicyEngine:
        """An engine for a policy that could not be loaded: every decision is a denial quoting ``error``."""
        return cls(PolicyDocument(version=1), source=source, load_error=error)

    @property
    def defaults(self) -> Defaults:
        """The policy's defaults (reservation TTL, content storage, default redaction)."""
        return self.document.defaults

    # -- subject resolution -------------------------------------------------------------------------------

    def _view(self, subject: Subject) -> _SubjectView:
        # Only the fields rules can match on form the key, so every try/map index of a task shares it.
        key = (subject.dag_id, subject.task_id, subject.owner, subject.tags, subject.bundle)
        view = self._subjects.get(key)
        if view is None:
            view = self._build_view(subject)
            if len(self._subjects) >= _MAX_CACHED_SUBJECTS:
                self._subjects.clear()
            self._subjects[key] = view
        return view

    def _build_view(self, subject: Subject) -> _SubjectView:
        if self.load_error is not None:
            return _SubjectView(rules=(), redaction=STRICTEST_REDACTION, budgets=())
        rules = tuple(r for r in self._rules if r.matcher.matches(subject))
        defaults = self.document.defaults
        patterns: dict[tuple[str, str], CustomPattern] = {}
        for compiled in rules:
            for pattern in compiled.rule.redaction.custom_patterns:
                patterns.setdefault((pattern.name, pattern.regex), pattern)
                pattern.compiled  # noqa: B018  # compile now, not inside the first redaction
        redaction = RedactionSettings(
            prompts=defaults.redact_prompts or any(r.rule.redaction.prompts for r in rules),
            outputs=defaults.redact_outputs or any(r.rule.redaction.outputs for r in rules),
            store_content=defaults.store_content,
            custom_patterns=tuple(patterns.values()),
            output_item_keys=_strictest_item_keys(
                defaults.output_item_keys, *(r.rule.redaction.output_item_keys for r in rules)
            ),
        )
        budgets = tuple(b for b, matcher in self._budget_matchers if matcher.matches(subject))
        approvals = tuple(a for r in rules for a in r.approvals)
        return _SubjectView(rules=rules, redaction=redaction, budgets=budgets, approvals=approvals)

    def matching_rules(self, subject: Subject) -> list[str]:
        """Names of the rules whose match applies to ``subject``, in file order."""
        return [r.rule.name for r in self._view(subject).rules]

    def redaction_for(self, subject: Subject) -> RedactionSettings:
        """The effective redaction settings for ``subject``."""
        return self._view(subject).redaction

    # -- decisions ------------------------------------------------------------------------------------------

    def _denied(self, view: _SubjectView, action: Action, resource: str, reason: str) -> Decision:
        if self.load_error is not None:
            reason = (
                f"denied {action} {resource!r}: policy {self.source} failed to load, so every request is "
                f"denied until it is fixed: {self.load_error}"
            )
        return Decision(False, action, resource, None, reason, view.redaction, None, self.digest)

    def _hint_rule(self, subject: Subject, grant: str) -> str:
        return f"to grant it, add a rule matching dag_id {subject.dag_id!r} with {grant} to {self.source}"

    def authorize_model(self, subject: Subject, connection_id: str, model: str) -> Decision:
        """May ``subject`` call ``model`` through the LLM connection ``connection_id``?

        The first granting rule (file order) is reported, and its grant's ``max_tokens_per_call`` applies.
        """
        view = self._view(subject)
        key = ("model", connection_id, model)
        cached = view.decisions.get(key)
        if cached is not None:
            return cached
        resource = f"{connection_id}/{model}"
        decision: Decision | None = None
        for compiled in view.rules:
            for grant in compiled.models:
                if grant.connection.matches(connection_id) and grant.model.matches(model):
                    decision = Decision(
                        True,
                        "model",
                        resource,
                        compiled.rule.name,
                        f"allowed by rule {compiled.rule.name!r}",
                        view.redaction,
                        grant.max_tokens_per_call,
                        self.digest,
                        grant.max_input_tokens or self.document.defaults.max_input_tokens_per_call,
                    )
                    break
            if decision is not None:
                break
        if decision is None:
            decision = self._denied(
                view,
                "model",
                resource,
                f"denied model {model!r} on connection {connection_id!r} for {_describe(subject)}: "
                f"{self._no_grant_detail(view)}; "
                + self._hint_rule(subject, f"models: [{{connection: {connection_id!r}, model: {model!r}}}]"),
            )
        self._remember(view, key, decision)
        return decision

    def authorize_tool(
        self, subject: Subject, tool_name: str, arguments: Mapping[str, object] | None
    ) -> Decision:
        """May ``subject`` call tool ``tool_name`` with these ``arguments``?

        A grant applies only if every argument constraint holds; a value of the wrong type is a denial.
        ``arguments=None`` asks whether the name is granted at all (parse-time checks, before arguments are
        rendered); a call is always decided with its arguments.
        """
        view = self._view(subject)
        violations: list[str] = []
        for compiled in view.rules:
            for grant in compiled.tools:
                if not grant.name.matches(tool_name):
                    continue
                problems = [] if arguments is None else self._argument_problems(grant, arguments)
                if not problems:
                    return Decision(
                        True,
                        "tool",
                        tool_name,
                        compiled.rule.name,
                        f"allowed by rule {compiled.rule.name!r}",
                        view.redaction,
                        None,
                        self.digest,
                    )
                violations.append(f"rule {compiled.rule.name!r}: " + "; ".join(problems))
        if violations:
            detail = (
                "the tool is granted, but the arguments break its constraints ("
                + " | ".join(violations)
                + f"); change the call, or relax the constraint in {self.source}"
            )
        else:
            detail = f"{self._no_grant_detail(view)}; " + self._hint_rule(
                subject, f"tools: [{{name: {tool_name!r}}}]"
            )
        return self._denied(
            view, "tool", tool_name, f"denied tool {tool_name!r} for {_describe(subject)}: {detail}"
        )

    def bundle_patterns(self) -> list[str]:
        """Every ``bundle`` glob the policy's rules match on, in file order."""
        patterns: list[str] = []
        for rule in self.document.rules:
            for pattern in rule.match.bundle if rule.match and rule.match.bundle else []:
                if pattern not in patterns:
                    patterns.append(pattern)
        return patterns

    @staticmethod
    def _argument_problems(grant: _CompiledToolGrant, arguments: Mapping[str, object]) -> list[str]:
        problems = [f"argument {arg!r} is required" for arg in grant.required if arg not in arguments]
        for arg, value in arguments.items():
            check = grant.checks.get(arg)
            if check is None:
                if not grant.allow_other_args:
                    problems.append(f"argument {arg!r} is not allowed (allow_other_args is false)")
                continue
            problem = check.violation(value)
            if problem is not None:
                problems.append(f"argument {arg!r} {problem}")
        return problems

    def authorize_collection(
        self, subject: Subject, collection: str, mode: Literal["read", "write"]
    ) -> Decision:
        """May ``subject`` read from (``mode="read"``) or write to (``mode="write"``) ``collection``?"""
        action: Action = "collection.read" if mode == "read" else "collection.write"
        view = self._view(subject)
        key = (action, collection, "")
        cached = view.decisions.get(key)
        if cached is not None:
            return cached
        decision: Decision | None = None
        name_granted_elsewhere = False
        for compiled in view.rules:
            for grant in compiled.collections:
                if not grant.name.matches(collection):
                    continue
                if grant.write if mode == "write" else grant.read:
                    decision = Decision(
                        True,
                        action,
                        collection,
                        compiled.rule.name,
                        f"allowed by rule {compiled.rule.name!r}",
                        view.redaction,
                        None,
                        self.digest,
                    )
                    break
                name_granted_elsewhere = True
            if decision is not None:
                break
        if decision is None:
            detail = (
                f"matching rules grant the collection, but not for {mode}"
                if name_granted_elsewhere
                else self._no_grant_detail(view)
            )
            decision = self._denied(
                view,
                action,
                collection,
                f"denied {mode} of collection {collection!r} for {_describe(subject)}: {detail}; "
                + self._hint_rule(subject, f"collections: [{{name: {collection!r}, {mode}: true}}]"),
            )
        self._remember(view, key, decision)
        return decision

    def cache_for(self, subject: Subject, connection_id: str, model: str) -> CacheSettings | None:
        """The response cache for ``subject``'s requests to ``model`` on ``connection_id``, or None (off).

        The first matching rule (file order) that has a ``cache`` whose ``models`` match ``model`` and that
        grants ``model`` on ``connection_id`` itself decides: a rule caches only what it grants.
        """
        view = self._view(subject)
        key = (connection_id, model)
        if key in view.caches:
            return view.caches[key]
        found: CacheSettings | None = None
        for compiled in view.rules:
            cache = compiled.rule.cache
            if cache is None or compiled.cache_models is None or not compiled.cache_models.matches(model):
                continue
            if any(g.connection.matches(connection_id) and g.model.matches(model) for g in compiled.models):
                found = CacheSettings(compiled.rule.name, cache.ttl_seconds, cache.outputs)
                break
        if len(view.caches) >= _MAX_CACHED_DECISIONS_PER_SUBJECT:
            view.caches.clear()
        view.caches[key] = found
        return found

    def approval_needed(
        self, subject: Subject, action: ApprovalAction, name: str, *, estimated_cost_usd: float | None = None
    ) -> ApprovalNeed | None:
        """Must a human approve this (already allowed) action first? None when no matching rule says so.

        ``name`` is the concrete model, the tool or the collection; ``estimated_cost_usd`` is a model call's
        worst-case cost (None when the model has no price: a cost threshold then requires approval). Any
        matching rule's entry that applies requires it (a tightening); the first in file order names the
        approvers and the timeout.
        """
        for approval in self._view(subject).approvals:
            if approval.applies(action, name, estimated_cost_usd):
                requirement = approval.requirement
                return ApprovalNeed(
                    action=action,
                    resource=name,
                    rule=approval.rule,
                    approvers=tuple(requirement.approvers),
                    timeout_minutes=requirement.timeout_minutes,
                    cost_threshold_usd=requirement.estimated_cost_above_usd,
                )
        return None

    def may_need_approval(self, subject: Subject, action: ApprovalAction) -> bool:
        """Whether any matching rule requires approval for some ``action`` (a cheap pre-check)."""
        return any(a.action == action for a in self._view(subject).approvals)

    @staticmethod
    def _no_grant_detail(view: _SubjectView) -> str:
        if not view.rules:
            return "no rule matches this task"
        names = ", ".join(repr(r.rule.name) for r in view.rules)
        return f"none of the matching rules ({names}) grants it"

    @staticmethod
    def _remember(view: _SubjectView, key: tuple[str, str, str], decision: Decision) -> None:
        if len(view.decisions) >= _MAX_CACHED_DECISIONS_PER_SUBJECT:
            view.decisions.clear()
        view.decisions[key] = decision

    # -- routing and budgets ------------------------------------------------------------------------------

    def route_for(self, subject: Subject, requested: str) -> ModelRoute | None:
        """The route a matching rule defines for the alias ``requested`` (the first such rule wins)."""
        for compiled in self._view(subject).rules:
            route = compiled.rule.model_routes.get(requested)
            if route is not None:
                return route
        return None

    def resolve_model(
        self, subject: Subject, connection_id: str, requested: str, *, economy: bool = False
    ) -> list[str]:
        """Concrete models to try, in order, for ``requested`` (a route alias or a model name).

        An alias defined by a matching rule (the first such rule wins) expands to ``[model, *fallbacks]``,
        or with ``economy`` (a budget past the route's ``when_budget_above`` threshold) to
        ``[cheaper model, *fallbacks]``; anything else is its own only candidate. Candidates the policy does
        not grant this subject on this connection are dropped, so an empty list means the request is denied.
        """
        candidates = [requested]
        route = self.route_for(subject, requested)
        if route is not None:
            first = route.when_budget_above.model if economy and route.when_budget_above else route.model
            candidates = [first, *route.fallbacks]
        resolved: list[str] = []
        for candidate in candidates:
            if candidate not in resolved and self.authorize_model(subject, connection_id, candidate).allowed:
                resolved.append(candidate)
        return resolved

    def budgets_for(self, subject: Subject, now: datetime | None = None) -> list[ApplicableBudget]:
        """The budgets that apply to ``subject``, with the ledger period they charge at ``now`` (UTC)."""
        if now is None:
            now = datetime.now(UTC)
        elif now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("now must be timezone-aware; budget periods are UTC calendar periods")
        now = now.astimezone(UTC)
        result = []
        for budget in self._view(subject).budgets:
            period_key, resets_at = _period(budget, subject, now)
            result.append(
                ApplicableBudget(
                    name=budget.name,
                    scope=budget.scope,
                    period=budget.period,
                    period_key=period_key,
                    resets_at=resets_at,
                    max_tokens=budget.max_tokens,
                    max_cost_usd=budget.max_cost_usd,
                )
            )
        return result

    def budgets_requiring_price(self, subject: Subject, model: str) -> list[str]:
        """Names of the budgets that apply to ``subject``, limit cost (``max_cost_usd``) and do not list
        ``model`` in ``allow_unpriced_models``: an unpriced ``model`` must not be charged against them,
        because its $0 would never reach their limit."""
        names = []
        for budget in self._view(subject).budgets:
            if budget.max_cost_usd is None:
                continue
            allowed = self._unpriced_allowed.get(budget.name)
            if allowed is None or not allowed.matches(model):
                names.append(budget.name)
        return names
