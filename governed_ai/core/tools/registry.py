"""Registries of tools that DAGs refer to by name.

Tools enter a registry only from code (a ``@tool`` decorator or ``register`` call in a module the DAG file
imports); nothing here turns a string from a connection, a variable or ``dag_run.conf`` into an import.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

from governed_ai.core.errors import ConfigurationError
from governed_ai.core.tools.tool import Tool


class UnknownToolError(ConfigurationError, KeyError):
    """No tool of that name is registered; the message lists the names that are."""

    def __str__(self) -> str:  # KeyError would print the message as a quoted repr
        return str(self.args[0])


class DuplicateToolError(ConfigurationError):
    """Another definition already holds this tool name."""


class ToolRegistry:
    """Name -> :class:`Tool`. Thread-safe.

    Registering the same definition again (same file and qualified name, as happens when a DAG folder
    module is imported under two module names) replaces the entry; a different definition under a taken
    name is an error, so one tool cannot silently shadow another.
    """

    def __init__(self, tools: Iterable[Tool] = (), *, name: str = "tools") -> None:
        self.name = name
        self._tools: dict[str, Tool] = {}
        self._lock = threading.Lock()
        for item in tools:
            self.register(item)

    def register(self, item: Tool) -> Tool:
        """Add ``item``; returns it so that ``register`` can be used inline."""
        if not isinstance(item, Tool):
            raise TypeError(f"only Tool objects can be registered, got {type(item).__name__}")
        with self._lock:
            existing = self._tools.get(item.name)
            if existing is not None and existing.origin != item.origin:
                raise DuplicateToolError(
                    f"tool name {item.name!r} is already registered in {self.name!r} by {existing.origin}; "
                    f"cannot register {item.origin} under the same name. Give one of them another name."
                )
            self._tools[item.name] = item
        return item

    def get(self, name: str) -> Tool:
        """The tool called ``name``, or :class:`UnknownToolError` naming the registered tools."""
        with self._lock:
            found = self._tools.get(name)
            if found is None:
                known = ", ".join(sorted(self._tools)) or "none"
                raise UnknownToolError(
                    f"no tool named {name!r} in registry {self.name!r} (registered: {known}). Import the "
                    "module that defines it in the DAG file, or fix the name."
                )
            return found

    def names(self) -> list[str]:
        """Registered tool names, sorted."""
        with self._lock:
            return sorted(self._tools)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        with self._lock:
            return iter(list(self._tools.values()))

    def __len__(self) -> int:
        with self._lock:
            return len(self._tools)


#: The process-wide registry that ``@tool`` registers into unless told otherwise.
default_registry = ToolRegistry(name="default")
