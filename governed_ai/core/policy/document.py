"""The governance policy file: validated models of what may run, on whose behalf, within which limits.

Format (YAML; every key not listed here is an error)::

    version: 1                          # required; the only version so far
    defaults:                           # optional
      reservation_ttl_seconds: 600      # how long a budget reservation lives before it is released
      max_input_tokens_per_call: 32000  # the largest prompt one call may send (a grant may set its own)
      store_content: false              # may (redacted) prompt/response text be kept in the audit trail
      redact_prompts: true              # redact prompts before they leave for the model
      redact_outputs: true              # redact model outputs before they reach logs, XCom or audit
      output_item_keys: redacted        # batch item keys in the task's own outputs (results/failures
                                        #   files, XCom, log lines): allow_pii | redacted | digest
    rules:
      - name: support-triage            # required, unique; reported in every decision it grants
        description: "..."              # optional, for humans
        match:                          # optional; omitted = every task. All given keys must match (AND);
          dag_id: "support_*"           #   each key takes a glob or a list of globs (any may match: OR)
          task_id: "*"
          owner: ["ai-team"]
          tags: ["support"]             #   the task has at least one tag matching one of these globs
          bundle: "prod-*"              #   the DAG bundle (configured by the deployment, not the DAG)
        models:                         # model grants: both globs must match
          - connection: "governed_ai_llm_default"   # glob on the LLM connection id
            model: "smollm2*"                       # glob on the concrete model name
            max_tokens_per_call: 512                # optional cap on max_tokens of one call
            max_input_tokens: 8000                  # optional cap on the prompt of one call
        model_routes:                   # role -> concrete model (+ fallbacks, tried in order)
          default:
            model: smollm2
            fallbacks: [smollm2-q8]
            when_budget_above: {fraction: 0.8, model: smollm2-economy}   # optional: a cheaper model
                                        # once a budget that applies is 80% used (spent and held)
        tools:
          - name: lookup_order          # glob on the tool name
            allow_other_args: true      # optional (default true): arguments not listed are unconstrained
            args:                       # per-argument constraints, all must hold
              order_id: {regex: "^[A-Z]{2}[0-9]{6}$", max_length: 8, required: true}
              region: {enum: [eu, us]}
              limit: {type: integer, min: 1, max: 50}
        collections:
          - name: "kb_*"                # glob on the vector-store collection name
            read: true                  # default true
            write: false                # default false
        redaction:                      # merged across all matching rules (OR / union); can only tighten
          prompts: true
          outputs: true
          custom_patterns: [{name: ticket_secret, regex: "TKT-[0-9a-f]{16}"}]
          output_item_keys: digest      # allow_pii | redacted | digest; a rule can only make it stricter
        cache:                          # optional; omitted = no response cache for this rule's tasks
          models: ["smollm2*"]          # globs on the concrete model name whose replies may be reused
          ttl_seconds: 86400            # how long a stored reply may be reused
          outputs: structured           # structured (only requests with an output schema) | all
        require_approval:               # optional: a human approves these actions before they run
          - models: ["gpt-4*"]          # glob(s) on the concrete model name (chat and embedding calls)
            estimated_cost_above_usd: 1.0   # optional: only calls whose worst-case cost is above this
            approvers: ["finance-lead"] # required: Airflow user ids who may answer (assigned users)
            timeout_minutes: 60         # optional (default 60): no answer by then is a rejection
          - tools: ["refund_*"]         # glob(s) on a tool name
            approvers: ["support-lead"]
          - collection_writes: ["prod_*"]   # glob(s) on a collection written to
            approvers: ["kb-owner"]
    budgets:
      - name: support-daily             # required, unique; the ledger key is (name, period key)
        scope: dag                      # dag | team | global
        match: {dag_id: "support_*"}    # dag: needs dag_id; team: needs owner and/or tags; global: no match
        period: day                     # run | day | month  (day and month are UTC calendar periods)
        max_tokens: 200000              # at least one of max_tokens / max_cost_usd
        max_cost_usd: 2.5
        allow_unpriced_models: ["smollm2*"]   # optional, only with max_cost_usd: these models may run
                                        #   without a price under this budget, counted in tokens only

Semantics worth knowing when writing a policy:

* Allow-only and fail-closed: a request is allowed only when at least one matching rule grants it.
* Argument constraints: ``regex`` must match the WHOLE string (``re.fullmatch``), ``enum`` compares exactly
  (case- and type-sensitive), ``min``/``max`` are inclusive and numeric only, ``min_length``/``max_length``
  apply to strings only, ``type`` is one of string | integer | number | boolean. A value of the wrong type
  for a constraint is a denial, never a coercion.
* Values are read strictly: ``max_tokens: "512"`` is an error, not 512. Unquoted ``yes``/``no``/``on``/``off``
  are YAML booleans, so quote them where a string is meant.
* ``dag_id``, ``task_id``, ``owner`` and ``tags`` are written by the DAG author, so a DAG can claim any of
  them; ``bundle`` is the DAG bundle the deployment loaded the DAG from. Match ``bundle`` in every rule that
  grants something the author must not be able to give themselves. A rule with ``bundle`` never matches a
  task whose bundle is unknown.
* A budget with a glob match is one shared pool for every task it matches (the ledger key does not contain
  the dag id).
* Prices come from the LLM connection's ``prices`` extra (the deployment's). A model with no price there
  costs nothing as far as a ``max_cost_usd`` limit could tell, so a request for it under a budget with a
  cost limit is **denied** (an audited ``budget.unpriced`` record naming the model, the budget and what to
  add), unless that budget lists the model in ``allow_unpriced_models`` (``["*"]``: every model): then its
  calls count against ``max_tokens`` only and add $0 to the cost. A model that is really free gets an
  explicit zero price in the connection instead.
* ``output_item_keys`` decides how a batch item's key appears in the task's own outputs (results and
  failures files, XCom, log lines); the audit trail and the journal only ever hold keyed digests of it.
  ``redacted`` (default): a key in which the redactor finds a secret, personal data or a custom pattern is
  replaced by ``digest:<16 hex>``, the digest the audit trail records for that item; other keys stay as
  they are, so results still join with their inputs. ``allow_pii``: personal data (e-mail, phone, card,
  IBAN, IP address) may appear in keys as given; a key holding a secret or a custom pattern is still
  replaced: secrets never appear. ``digest``: every key is replaced. Rows also carry the item's
  ``position`` in the input.
* ``cache`` turns on the governed response cache (off by default; only the policy can turn it on). A
  request whose connection, model, redacted request body and prompt version equal those of a reply stored
  less than ``ttl_seconds`` ago is answered from the governance store: still authorized first (a revoked
  grant denies it), never sent, nothing reserved, $0, audited as ``model.cache_hit``. Stored replies are
  the redacted ones the journal keeps. ``outputs: structured`` caches only requests with an output schema,
  ``all`` every chat reply; a reply that failed validation is never stored. Embeddings of a cached model
  are cached under either setting. For a task several matching rules could cache, the first (file
  order) whose ``models`` matches (and that grants the model) decides; entries are shared by the tasks
  one rule matches, never across rules. ``governed-ai cache purge`` removes stored replies by age or
  prompt version.
* ``require_approval`` only ever tightens: it is checked after the action is allowed (a denial stays a
  denial), and it applies whether or not the rule that says it grants anything, so a rule may consist of a
  ``match`` and ``require_approval`` alone. Each entry names one kind of action: ``models`` (optionally with
  ``estimated_cost_above_usd``), ``estimated_cost_above_usd`` alone (any model call above that worst-case
  cost: the prompt's tokens plus ``max_tokens`` or 1024, at the connection's prices), ``tools``, or
  ``collection_writes``. When several entries of the matching rules apply, the first in file order names
  the approvers and the timeout. The task asks through Airflow's human-in-the-loop mechanism (Airflow
  3.1+; deferred, it holds no worker slot) before anything is reserved, paid or run; an approval holds for
  that resource for the rest of the task instance (its retries included), a rejection or no answer within
  ``timeout_minutes`` fails the task without retries (and a later try of that task instance is denied
  without asking; a new run asks again). Every answer is audited (``approval.granted`` /
  ``approval.rejected``) with the approver. A journal replay or a response-cache hit sends
  nothing to the model and asks nobody. A task instance asks for one approval: one that needs a second,
  different one fails (Airflow keeps one human-in-the-loop request per task instance).
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    model_validator,
)

_GLOB_CHARACTERS = frozenset("*?[")


class LocatedValueError(ValueError):
    """A validation error that knows which nested field it is about.

    Pydantic reports a model-level validator's error at the model itself; carrying the relative location
    lets the loader point at the exact line (e.g. the second of two rules with the same name).
    """

    def __init__(self, message: str, relative_loc: tuple[str | int, ...]) -> None:
        super().__init__(message)
        self.relative_loc = relative_loc


def _one_or_many(value: Any) -> Any:
    # Accept the natural `dag_id: "x"` as well as `dag_id: ["x", "y"]`.
    return [value] if isinstance(value, str) else value


def _non_empty(values: list[str]) -> list[str]:
    if not values:
        raise ValueError("an empty list matches nothing; omit the key to match anything, or give a pattern")
    if any(value == "" for value in values):
        raise ValueError("an empty pattern matches nothing; use '*' to match anything")
    return values


def _valid_regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(
            f"invalid regular expression {pattern!r}: {exc}; expected a Python `re` pattern"
        ) from exc
    return pattern


def _concrete_name(name: str) -> str:
    if not name or _GLOB_CHARACTERS.intersection(name):
        raise ValueError(f"{name!r} must be a concrete model name, not empty and without glob characters *?[")
    return name


def _number(value: Any) -> int | float:
    # bool is an int subclass, but `min: true` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {type(value).__name__} {value!r}")
    return value


def _scalar(value: Any) -> str | int | float | bool:
    if not isinstance(value, str | int | float | bool):
        raise ValueError(f"expected a string, number or boolean, got {type(value).__name__} {value!r}")
    return value


GlobList = Annotated[list[str], BeforeValidator(_one_or_many), AfterValidator(_non_empty)]
"""One glob or a non-empty list of globs (fnmatch syntax, case-sensitive)."""

RegexPattern = Annotated[str, AfterValidator(_valid_regex)]
ConcreteModelName = Annotated[str, AfterValidator(_concrete_name)]
# Plain validators instead of unions: union errors would be reported once per member type, under
# locations that do not exist in the file.
Number = Annotated[int | float, PlainValidator(_number)]
EnumValue = Annotated[str | int | float | bool, PlainValidator(_scalar)]


class _PolicyModel(BaseModel):
    # Strict: a policy typo must be an error, never a silently coerced or ignored value.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


OutputItemKeys = Literal["allow_pii", "redacted", "digest"]
"""How batch item keys appear in a task's own outputs, from the laxest to the strictest."""
OUTPUT_ITEM_KEYS_ORDER: tuple[OutputItemKeys, ...] = ("allow_pii", "redacted", "digest")


class Defaults(_PolicyModel):
    """Policy-wide settings; rules can only tighten the redaction ones."""

    reservation_ttl_seconds: int = Field(default=600, gt=0)
    max_input_tokens_per_call: int = Field(default=32_000, gt=0)
    store_content: bool = False
    redact_prompts: bool = True
    redact_outputs: bool = True
    output_item_keys: OutputItemKeys = "redacted"


class SubjectMatch(_PolicyModel):
    """Which tasks a rule or budget applies to: all given keys must match; omitted keys match anything."""

    dag_id: GlobList | None = None
    task_id: GlobList | None = None
    owner: GlobList | None = None
    tags: GlobList | None = None
    bundle: GlobList | None = None

    def given_keys(self) -> frozenset[str]:
        """Names of the keys that constrain the match."""
        return frozenset(key for key in type(self).model_fields if getattr(self, key) is not None)


class ModelGrant(_PolicyModel):
    """Permission to call a model (glob) on an LLM connection (glob)."""

    connection: str = Field(min_length=1)
    model: str = Field(min_length=1)
    max_tokens_per_call: int | None = Field(default=None, gt=0)
    max_input_tokens: int | None = Field(default=None, gt=0)


class BudgetSwitch(_PolicyModel):
    """Use a cheaper model once a budget that applies is used past ``fraction`` (spent and held)."""

    fraction: float = Field(gt=0, le=1)
    model: ConcreteModelName
    budget: GlobList | None = None  # which budgets count (globs on their names); omitted: any that applies


class ModelRoute(_PolicyModel):
    """A role DAG authors ask for, resolved to a concrete model and ordered fallbacks."""

    model: ConcreteModelName
    fallbacks: list[ConcreteModelName] = Field(default_factory=list)
    when_budget_above: BudgetSwitch | None = None


class ArgumentConstraint(_PolicyModel):
    """Constraints one tool argument must satisfy; all given ones must hold."""

    required: bool = False
    type: Literal["string", "integer", "number", "boolean"] | None = None
    regex: RegexPattern | None = None
    min_length: int | None = Field(default=None, ge=0)
    max_length: int | None = Field(default=None, ge=0)
    enum: list[EnumValue] | None = None
    min: Number | None = None
    max: Number | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ArgumentConstraint:
        string_keys = [k for k in ("regex", "min_length", "max_length") if getattr(self, k) is not None]
        number_keys = [k for k in ("min", "max") if getattr(self, k) is not None]
        # Such a constraint could never be satisfied; it is a mistake in the policy, not a way to deny.
        if string_keys and number_keys:
            raise LocatedValueError(
                f"string constraints ({', '.join(string_keys)}) and numeric constraints "
                f"({', '.join(number_keys)}) can never both hold; use one kind per argument",
                (number_keys[0],),
            )
        if self.type in ("integer", "number", "boolean") and string_keys:
            raise LocatedValueError(
                f"{string_keys[0]} applies to strings, but type is {self.type}", ("type",)
            )
        if self.type in ("string", "boolean") and number_keys:
            raise LocatedValueError(
                f"{number_keys[0]} applies to numbers, but type is {self.type}", ("type",)
            )
        if self.min is not None and self.max is not None and self.min > self.max:
            raise LocatedValueError(f"min {self.min} is greater than max {self.max}", ("min",))
        if self.min_length is not None and self.max_length is not None and self.min_length > self.max_length:
            raise LocatedValueError(
                f"min_length {self.min_length} is greater than max_length {self.max_length}", ("min_length",)
            )
        if self.enum is not None:
            if not self.enum:
                raise LocatedValueError("an empty enum allows nothing; list the allowed values", ("enum",))
            if any(isinstance(v, bool) for v in self.enum) and any(isinstance(v, str) for v in self.enum):
                raise LocatedValueError(
                    "enum mixes strings and booleans; YAML reads unquoted yes/no/on/off/true/false as "
                    "booleans, so quote them if they are meant as strings",
                    ("enum",),
                )
        return self


class ToolGrant(_PolicyModel):
    """Permission to call a tool (glob on its name) with arguments that satisfy the constraints."""

    name: str = Field(min_length=1)
    allow_other_args: bool = True
    args: dict[str, ArgumentConstraint] = Field(default_factory=dict)


class CollectionGrant(_PolicyModel):
    """Permission to read and/or write a vector-store collection (glob on its name)."""

    name: str = Field(min_length=1)
    read: bool = True
    write: bool = False


class CustomPattern(_PolicyModel):
    """An extra secret/PII pattern the redactor must mask for tasks the rule matches."""

    # The name becomes the replacement marker (e.g. <TICKET_SECRET>), so it must contain a letter or digit.
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    regex: RegexPattern

    @cached_property
    def compiled(self) -> re.Pattern[str]:
        """The regex, compiled once (validated at load, so this cannot fail)."""
        return re.compile(self.regex)


class RedactionRule(_PolicyModel):
    """Redaction a rule adds for the tasks it matches; merged with OR/union, so it can only tighten."""

    prompts: bool = False
    outputs: bool = False
    custom_patterns: list[CustomPattern] = Field(default_factory=list)
    # None: the defaults' setting; a value stricter than it tightens it, a laxer one changes nothing.
    output_item_keys: OutputItemKeys | None = None


class ResponseCacheRule(_PolicyModel):
    """Which models' replies a rule lets the governed client reuse, and for how long."""

    models: GlobList
    ttl_seconds: int = Field(gt=0)
    outputs: Literal["structured", "all"] = "structured"


def _approvers(values: list[str]) -> list[str]:
    if not values:
        raise ValueError("an approval needs at least one approver: list the Airflow user ids who may answer")
    if any(not value.strip() for value in values):
        raise ValueError("an approver must be a non-empty Airflow user id")
    return values


class ApprovalRequirement(_PolicyModel):
    """Actions a human must approve (through Airflow's human-in-the-loop) before they run."""

    models: GlobList | None = None
    tools: GlobList | None = None
    collection_writes: GlobList | None = None
    estimated_cost_above_usd: Number | None = None
    approvers: Annotated[list[str], AfterValidator(_approvers)]
    timeout_minutes: int = Field(default=60, gt=0, le=60 * 24 * 30)

    @model_validator(mode="after")
    def _one_kind(self) -> ApprovalRequirement:
        kinds = [k for k in ("models", "tools", "collection_writes") if getattr(self, k) is not None]
        if len(kinds) > 1:
            raise LocatedValueError(
                f"one approval entry names one kind of action, got {' and '.join(kinds)}; "
                "write one entry per kind",
                (kinds[1],),
            )
        if self.estimated_cost_above_usd is not None:
            if self.estimated_cost_above_usd < 0:
                raise LocatedValueError(
                    f"estimated_cost_above_usd must be 0 or more, got {self.estimated_cost_above_usd}",
                    ("estimated_cost_above_usd",),
                )
            if kinds and kinds[0] != "models":
                raise LocatedValueError(
                    f"estimated_cost_above_usd applies to model calls only, not to {kinds[0]}",
                    ("estimated_cost_above_usd",),
                )
        elif not kinds:
            raise LocatedValueError(
                "an approval entry needs models, tools, collection_writes or estimated_cost_above_usd "
                "(what must be approved)",
                (),
            )
        return self


class Rule(_PolicyModel):
    """One allow-rule: which tasks it matches and what it grants them."""

    name: str = Field(min_length=1)
    description: str = ""
    match: SubjectMatch = Field(default_factory=SubjectMatch)
    models: list[ModelGrant] = Field(default_factory=list)
    model_routes: dict[str, ModelRoute] = Field(default_factory=dict)
    tools: list[ToolGrant] = Field(default_factory=list)
    collections: list[CollectionGrant] = Field(default_factory=list)
    redaction: RedactionRule = Field(default_factory=RedactionRule)
    cache: ResponseCacheRule | None = None
    require_approval: list[ApprovalRequirement] = Field(default_factory=list)


class Budget(_PolicyModel):
    """A token and/or cost limit for the tasks in its scope over a period."""

    name: str = Field(min_length=1)
    scope: Literal["dag", "team", "global"]
    match: SubjectMatch | None = None
    period: Literal["run", "day", "month"]
    max_tokens: int | None = Field(default=None, gt=0)
    max_cost_usd: float | None = Field(default=None, gt=0)
    # Models (globs) that may run without a price under this budget's cost limit, counted in tokens only.
    allow_unpriced_models: GlobList | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Budget:
        if self.max_tokens is None and self.max_cost_usd is None:
            raise LocatedValueError(
                f"budget {self.name!r} has no limit; expected max_tokens and/or max_cost_usd", ()
            )
        if self.allow_unpriced_models is not None and self.max_cost_usd is None:
            raise LocatedValueError(
                f"budget {self.name!r} has allow_unpriced_models but no max_cost_usd; it only says which "
                "models a cost limit lets run without a price, so remove it or add max_cost_usd",
                ("allow_unpriced_models",),
            )
        keys = self.match.given_keys() if self.match is not None else frozenset()
        if self.scope == "global" and keys:
            raise LocatedValueError(
                "a global budget applies to everyone; remove match or change scope", ("match",)
            )
        if self.scope == "dag" and "dag_id" not in keys:
            raise LocatedValueError("a dag budget needs match.dag_id (a glob or list of globs)", ("match",))
        if self.scope == "team":
            if not keys & {"owner", "tags", "bundle"}:
                raise LocatedValueError(
                    "a team budget needs match.owner, match.tags and/or match.bundle", ("match",)
                )
            if keys & {"dag_id", "task_id"}:
                raise LocatedValueError(
                    "a team budget matches by owner/tags/bundle only; "
                    "use scope dag to limit by dag_id/task_id",
                    ("match",),
                )
        return self


class PolicyDocument(_PolicyModel):
    """The whole validated policy file."""

    version: Literal[1]
    defaults: Defaults = Field(default_factory=Defaults)
    rules: list[Rule] = Field(default_factory=list)
    budgets: list[Budget] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> PolicyDocument:
        sections: tuple[tuple[str, list[str]], ...] = (
            ("rules", [rule.name for rule in self.rules]),
            ("budgets", [budget.name for budget in self.budgets]),
        )
        for section, names in sections:
            first_index: dict[str, int] = {}
            for index, name in enumerate(names):
                if name in first_index:
                    raise LocatedValueError(
                        f"duplicate name {name!r} (also {section}[{first_index[name]}]); "
                        "names must be unique because decisions and ledgers refer to them",
                        (section, index, "name"),
                    )
                first_index[name] = index
        return self
