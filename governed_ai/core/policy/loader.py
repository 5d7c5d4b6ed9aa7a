"""Reading the policy file: YAML to a validated ``PolicyDocument``, errors that point at lines, hot reload.

Loading is fail-closed: ``PolicyProvider`` never falls back to an older or a permissive policy. If the
current file cannot be loaded, its engine denies every request and quotes the load error.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import threading
import time
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from governed_ai.core.policy.document import LocatedValueError, PolicyDocument
from governed_ai.core.policy.engine import PolicyEngine

Loc = tuple[str | int, ...]

INLINE_SOURCE = "<inline policy>"


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    """One problem in a policy file: where (line, field path) and what is wrong / expected."""

    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}, " if self.line is not None else ""
        return f"{where}{self.path}: {self.message}"


class PolicyError(Exception):
    """A policy file that cannot be used; the message names the file, lines, fields and the fix."""

    def __init__(self, source: str, issues: Sequence[PolicyIssue]) -> None:
        self.source = source
        self.issues = tuple(issues)
        if len(self.issues) == 1:
            message = f"invalid policy {source}: {self.issues[0]}"
        else:
            details = "\n".join(f"  - {issue}" for issue in self.issues)
            message = f"invalid policy {source} ({len(self.issues)} problems):\n{details}"
        super().__init__(message)


def format_path(loc: Loc) -> str:
    """``('rules', 0, 'match', 'dag_id')`` -> ``rules[0].match.dag_id``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(document)"


# -- YAML with positions ----------------------------------------------------------------------------------


def _index_lines(
    node: yaml.Node, path: Loc, lines: dict[Loc, int], issues: list[PolicyIssue], active: set[int]
) -> None:
    """Record the 1-based line of every key and list item, and flag duplicate keys.

    PyYAML silently keeps the last of two equal keys, which would hide half of a rule; that is an error here.
    """
    if id(node) in active:  # a recursive alias; constructing it fails later with a clear type error
        return
    active.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in first_seen:
                issues.append(
                    PolicyIssue(
                        line,
                        format_path((*path, key)),
                        f"duplicate key {key!r} (first on line {first_seen[key]}); "
                        "YAML would silently keep only the last one, so merge them",
                    )
                )
            else:
                first_seen[key] = line
            lines.setdefault((*path, key), line)
            _index_lines(value_node, (*path, key), lines, issues, active)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.setdefault((*path, index), item.start_mark.line + 1)
            _index_lines(item, (*path, index), lines, issues, active)
    active.discard(id(node))


def _parse_yaml(text: str, source: str) -> tuple[Any, dict[Loc, int]]:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise PolicyError(
                source, [PolicyIssue(None, "(document)", "the file is empty; expected `version: 1`")]
            )
        lines: dict[Loc, int] = {(): node.start_mark.line + 1}
        issues: list[PolicyIssue] = []
        _index_lines(node, (), lines, issues, set())
        if issues:
            raise PolicyError(source, issues)
        return loader.construct_document(node), lines
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = " ".join(part for part in (exc.context, exc.problem) if part)
        raise PolicyError(
            source, [PolicyIssue(line, "(yaml syntax)", f"{problem}; expected valid YAML")]
        ) from exc
    except yaml.YAMLError as exc:
        raise PolicyError(source, [PolicyIssue(None, "(yaml syntax)", str(exc))]) from exc
    finally:
        loader.dispose()


# -- pydantic errors -> readable issues --------------------------------------------------------------------


def _unwrap(annotation: Any) -> Any:
    """Strip ``Annotated[...]`` and ``X | None`` down to the type that holds the value."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The pydantic model class whose mapping ``loc`` points at, if any (used to list the allowed keys)."""
    current: Any = PolicyDocument
    for part in loc:
        current = _unwrap(current)
        origin = typing.get_origin(current)
        if origin is list and isinstance(part, int):
            current = typing.get_args(current)[0]
        elif origin is dict:
            current = typing.get_args(current)[1]
        elif (
            isinstance(current, type) and issubclass(current, BaseModel) and str(part) in current.model_fields
        ):
            current = current.model_fields[str(part)].annotation
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _issue_from_error(error: Any, lines: dict[Loc, int]) -> PolicyIssue:
    loc: Loc = tuple(error["loc"])
    kind = error["type"]
    located = error.get("ctx", {}).get("error")
    if isinstance(located, LocatedValueError):
        loc = (*loc, *located.relative_loc)
    if kind == "extra_forbidden":
        key = str(loc[-1])
        model = _model_at(loc[:-1])
        allowed = sorted(model.model_fields) if model is not None else []
        message = f"unknown key {key!r}"
        close = difflib.get_close_matches(key, allowed, n=1)
        if close:
            message += f" (did you mean {close[0]!r}?)"
        if allowed:
            message += f"; expected one of: {', '.join(allowed)}"
    elif kind == "missing":
        message = "required key is missing"
    elif kind == "value_error":
        message = str(error["msg"]).removeprefix("Value error, ")
    else:
        message = f"{error['msg']}, got {_short(error.get('input'))}"
    # Missing keys are not in the file: point at the closest enclosing key that is.
    line = None
    for end in range(len(loc), -1, -1):
        line = lines.get(loc[:end])
        if line is not None:
            break
    return PolicyIssue(line, format_path(loc), message)


# -- public loading API -----------------------------------------------------------------------------------


def load_policy_text(text: str, *, source: str = INLINE_SOURCE) -> PolicyDocument:
    """Parse and validate policy YAML; raises ``PolicyError`` naming ``source``, lines and fields."""
    data, lines = _parse_yaml(text, source)
    if not isinstance(data, dict):
        raise PolicyError(
            source,
            [
                PolicyIssue(
                    lines[()], "(document)", f"expected a mapping with `version: 1`, got {_short(data)}"
                )
            ],
        )
    try:
        return PolicyDocument.model_validate(data)
    except ValidationError as exc:
        issues: list[PolicyIssue] = []
        for error in exc.errors():
            issue = _issue_from_error(error, lines)
            if issue not in issues:
                issues.append(issue)
        issues.sort(key=lambda i: (i.line is None, i.line or 0))
        raise PolicyError(source, issues) from None


def load_policy_file(path: str | os.PathLike[str]) -> PolicyDocument:
    """Read and validate a policy file; raises ``PolicyError`` for unreadable or invalid files."""
    source = str(path)
    return load_policy_text(_read_text(Path(path), source), source=source)


def _read_text(path: Path, source: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(
            source, [PolicyIssue(None, "(file)", f"cannot read the policy file: {exc}")]
        ) from exc


def engine_from_text(text: str, *, source: str = INLINE_SOURCE) -> PolicyEngine:
    """Build an engine from policy YAML, or a deny-all engine carrying the load error. Never raises."""
    try:
        document = load_policy_text(text, source=source)
    except PolicyError as exc:
        return PolicyEngine.deny_all(str(exc), source=source)
    return PolicyEngine(document, source=source, digest=hashlib.sha256(text.encode("utf-8")).hexdigest())


class PolicyProvider:
    """The current policy engine for a file (hot-reloaded) or inline YAML, always fail-closed.

    The file is checked with ``stat`` at most every ``check_interval_seconds``; when its mtime, size or
    inode changes it is re-read, and rebuilt when its content hash changed. If the current file is missing
    or invalid, ``engine()`` is a deny-all engine whose denials quote the error; fixing the file restores it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        text: str | None = None,
        source: str | None = None,
        check_interval_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if (path is None) == (text is None):
            raise ValueError("give exactly one of path (a policy file) or text (inline policy YAML)")
        if check_interval_seconds < 0:
            raise ValueError("check_interval_seconds must be >= 0")
        self.path = Path(path) if path is not None else None
        self.source = source or (str(path) if path is not None else INLINE_SOURCE)
        self.check_interval_seconds = check_interval_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int] | None = None
        self._digest: str | None = None
        self._last_check = clock()
        if text is not None:
            self._engine = engine_from_text(text, source=self.source)
        else:
            self._engine = PolicyEngine.deny_all("not loaded yet", source=self.source)
            self.refresh(force=True)

    @property
    def load_error(self) -> str | None:
        """Why the current policy is deny-all, or None when it loaded."""
        return self._engine.load_error

    def engine(self) -> PolicyEngine:
        """The engine for the current policy, reloading first if the check interval has passed."""
        if self.path is not None and self._clock() - self._last_check >= self.check_interval_seconds:
            self.refresh()
        return self._engine

    def refresh(self, *, force: bool = False) -> bool:
        """Check the file now; returns True when a new engine (valid or deny-all) was installed."""
        if self.path is None:
            return False
        with self._lock:
            self._last_check = self._clock()
            try:
                stat = self.path.stat()
            except OSError as exc:
                return self._install_error(f"cannot read the policy file: {exc}")
            signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if signature == self._signature and not force:
                return False
            self._signature = signature
            try:
                text = _read_text(self.path, self.source)
            except PolicyError as exc:
                return self._install_error(str(exc))
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            if digest == self._digest and not force:
                return False  # touched or rewritten with the same content
            self._digest = digest
            self._engine = engine_from_text(text, source=self.source)
            return True

    def _install_error(self, message: str) -> bool:
        self._signature = None
        self._digest = None
        if self._engine.load_error == message:
            return False
        self._engine = PolicyEngine.deny_all(message, source=self.source)
        return True
