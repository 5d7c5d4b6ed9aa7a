"""Governance for code the provider does not write: pydantic-ai agents (and the common-ai operators built on
them). Each module imports its optional dependency lazily, under the extra that installs it."""
