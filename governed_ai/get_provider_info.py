"""Provider metadata read by Airflow's ProvidersManager through the ``apache_airflow_provider`` entry point.

Kept as plain data with no imports: Airflow reads it in every process, and an error here breaks every
``airflow`` command.
"""

from __future__ import annotations

from typing import Any


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-provider-governed-ai",
        "name": "Governed AI",
        "description": (
            "Governed AI pipelines: LLM, retrieval, tool and validation operators that all pass through "
            "one policy, budget, redaction and audit layer."
        ),
        "versions": ["0.1.0"],
        "integrations": [
            {"integration-name": "Governed AI", "tags": ["ai"]},
        ],
        "hooks": [
            {
                "integration-name": "Governed AI",
                "python-modules": [
                    "governed_ai.hooks.llm",
                    "governed_ai.hooks.governance",
                    "governed_ai.hooks.chroma",
                    "governed_ai.hooks.pydantic_ai",
                ],
            }
        ],
        "operators": [
            {
                "integration-name": "Governed AI",
                "python-modules": [
                    "governed_ai.operators.llm",
                    "governed_ai.operators.chroma",
                    "governed_ai.operators.quality",
                    "governed_ai.operators.tool",
                    "governed_ai.operators.agent",
                    "governed_ai.operators.batch",
                ],
            },
        ],
        "sensors": [
            {
                "integration-name": "Governed AI",
                "python-modules": ["governed_ai.sensors.chroma", "governed_ai.sensors.budget"],
            },
        ],
        "triggers": [
            {
                "integration-name": "Governed AI",
                "python-modules": ["governed_ai.triggers.chroma", "governed_ai.triggers.budget"],
            },
        ],
        "config": {
            "governed_ai": {
                "description": "Governance of AI calls: where the policy and the audit/budget store live.",
                "options": {
                    "policy_path": {
                        "description": (
                            "YAML policy file. Without a policy every governed call is denied (fail-closed)."
                        ),
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "/opt/airflow/policies/governance_policy.yaml",
                        "default": None,
                    },
                    "store_url": {
                        "description": (
                            "SQLAlchemy URL of the audit trail and budget ledger. Default: a SQLite file "
                            "under AIRFLOW_HOME/governed_ai/. Use PostgreSQL with several workers."
                        ),
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "postgresql+psycopg://airflow:***@db/governance",
                        "default": None,
                    },
                    "allowed_governance_conn_ids": {
                        "description": (
                            "Comma-separated ids of the governed_ai_governance connections a task may name "
                            "in an operator's governance_conn_id (the connection decides the policy, store "
                            "and audit key, so the deployment chooses it, not the DAG). A task naming "
                            "another fails before any call. Default: only governed_ai_governance_default."
                        ),
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": "governed_ai_governance_default,governed_ai_governance_eu",
                        "default": "governed_ai_governance_default",
                    },
                    "policy_check_interval_seconds": {
                        "description": "How often a worker checks the policy file for changes.",
                        "version_added": "0.1.0",
                        "type": "float",
                        "example": "5",
                        "default": "5",
                    },
                    "audit_hmac_key": {
                        "description": (
                            "Secret key of the audit chain's HMAC (at least 16 characters), shared by every "
                            "worker and never stored in the governance database. Also read from "
                            "audit_hmac_key_cmd, audit_hmac_key_secret or a secrets backend. The governance "
                            "connection's password wins over it. Unset on a single machine: a key file "
                            "AIRFLOW_HOME/governed_ai/audit.key is created."
                        ),
                        "version_added": "0.2.0",
                        "type": "string",
                        "sensitive": True,
                        "example": None,
                        "default": None,
                    },
                    "audit_anchor_path": {
                        "description": (
                            "Where copies of the audit chain head (anchors) are kept, outside the database: "
                            "a local directory or an object-storage URL (s3://conn_id@bucket/anchors/). "
                            "Default: AIRFLOW_HOME/governed_ai/anchors/."
                        ),
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": "s3://aws_default@audit-anchors/governance/",
                        "default": None,
                    },
                    "audit_anchor_every_records": {
                        "description": "A writer anchors the chain head after this many records.",
                        "version_added": "0.2.0",
                        "type": "integer",
                        "example": "1000",
                        "default": "1000",
                    },
                    "audit_anchor_every_seconds": {
                        "description": "... or once this many seconds have passed since its last anchor.",
                        "version_added": "0.2.0",
                        "type": "float",
                        "example": "60",
                        "default": "60",
                    },
                },
            }
        },
        "connection-types": [
            {
                # Needs the common-ai extra; without it Airflow reports this connection type as switched off.
                "hook-class-name": "governed_ai.hooks.pydantic_ai.GovernedPydanticAIHook",
                "hook-name": "Governed AI: pydantic-ai model (common-ai operators)",
                "connection-type": "governed_ai_pydanticai",
                "conn-fields": {
                    "llm_conn_id": {
                        "label": "LLM connection",
                        "schema": {"type": ["string", "null"], "default": "governed_ai_llm_default"},
                        "description": "The governed_ai_llm connection the model's requests go to.",
                    },
                    "governance_conn_id": {
                        "label": "Governance connection",
                        "schema": {"type": ["string", "null"], "default": "governed_ai_governance_default"},
                        "description": "One of [governed_ai] allowed_governance_conn_ids.",
                    },
                    "model": {
                        "label": "Model or policy route",
                        "schema": {"type": ["string", "null"]},
                        "description": (
                            "Default: the LLM connection's default_model. The operator's model_id wins."
                        ),
                    },
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "login", "host", "password"],
                    "relabeling": {},
                    "placeholders": {},
                },
            },
            {
                "hook-class-name": "governed_ai.hooks.llm.LLMHook",
                "hook-name": "Governed AI: LLM (OpenAI-compatible)",
                "connection-type": "governed_ai_llm",
                "conn-fields": {
                    "default_model": {
                        "label": "Default model",
                        "schema": {"type": ["string", "null"]},
                        "description": "Model used when an operator does not name one, e.g. gpt-4o-mini.",
                    },
                    "organization": {"label": "Organization", "schema": {"type": ["string", "null"]}},
                    "project": {"label": "Project", "schema": {"type": ["string", "null"]}},
                    "timeout": {
                        "label": "Timeout (seconds)",
                        "schema": {"type": ["number", "null"], "default": 60},
                    },
                    "max_retries": {
                        "label": "Max retries",
                        "schema": {"type": ["integer", "null"], "default": 3},
                        "description": "Retries on 429/5xx/timeouts, honouring Retry-After.",
                    },
                    "structured_output": {
                        "label": "Structured output dialect",
                        "schema": {
                            "type": ["string", "null"],
                            "enum": ["json_schema", "json_object"],
                            "default": "json_schema",
                        },
                        "description": "json_schema for OpenAI; json_object for llama.cpp-style servers.",
                    },
                    "prices": {
                        "label": "Prices (USD per 1M tokens)",
                        "schema": {"type": ["object", "null"]},
                        "description": (
                            'JSON: {"model-or-glob": {"input_per_1m_tokens": 0.15, '
                            '"output_per_1m_tokens": 0.6}}'
                        ),
                    },
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "login"],
                    "relabeling": {"host": "Base URL", "password": "API key"},
                    "placeholders": {"host": "https://api.openai.com/v1"},
                },
            },
            {
                "hook-class-name": "governed_ai.hooks.chroma.ChromaHook",
                "hook-name": "Governed AI: Chroma",
                "connection-type": "governed_ai_chroma",
                "conn-fields": {
                    "path": {
                        "label": "Embedded data directory",
                        "schema": {"type": ["string", "null"]},
                        "description": (
                            "Used when Host is empty (embedded Chroma). "
                            "Default: AIRFLOW_HOME/governed_ai/chroma."
                        ),
                    },
                    "ssl": {"label": "Use TLS", "schema": {"type": ["boolean", "null"], "default": False}},
                    "auth_header": {
                        "label": "Token header",
                        "schema": {
                            "type": ["string", "null"],
                            "enum": ["Authorization", "X-Chroma-Token"],
                            "default": "Authorization",
                        },
                        "description": "How the token (password field) is sent to the Chroma server.",
                    },
                    "tenant": {"label": "Tenant", "schema": {"type": ["string", "null"]}},
                    "embedding": {
                        "label": "Embeddings",
                        "schema": {
                            "type": ["string", "null"],
                            "enum": ["offline", "openai"],
                            "default": "offline",
                        },
                        "description": (
                            "offline: all-MiniLM-L6-v2 (ONNX, from PyPI, no network); openai: an "
                            "OpenAI-compatible /v1/embeddings endpoint through an LLM connection."
                        ),
                    },
                    "embedding_model": {
                        "label": "Embedding model (openai)",
                        "schema": {"type": ["string", "null"]},
                        "description": "e.g. text-embedding-3-small",
                    },
                    "embedding_conn_id": {
                        "label": "LLM connection for embeddings",
                        "schema": {"type": ["string", "null"], "default": "governed_ai_llm_default"},
                    },
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["login"],
                    "relabeling": {"password": "Auth token", "schema": "Database"},
                    "placeholders": {"host": "empty = embedded Chroma", "port": "8000"},
                },
            },
            {
                "hook-class-name": "governed_ai.hooks.governance.GovernanceHook",
                "hook-name": "Governed AI: Governance",
                "connection-type": "governed_ai_governance",
                "conn-fields": {
                    "policy_path": {
                        "label": "Policy file path",
                        "schema": {"type": ["string", "null"]},
                        "description": "YAML policy; reloaded when it changes.",
                    },
                    "policy_yaml": {
                        "label": "Inline policy (YAML)",
                        "schema": {"type": ["string", "null"]},
                        "description": "Used when no policy file path is set.",
                    },
                    "audit_anchor_path": {
                        "label": "Audit anchor location",
                        "schema": {"type": ["string", "null"]},
                        "description": (
                            "Directory or object-storage URL for copies of the audit chain head; "
                            "default AIRFLOW_HOME/governed_ai/anchors/."
                        ),
                    },
                    "store_url": {
                        "label": "Audit/ledger store URL",
                        "schema": {"type": ["string", "null"]},
                        "description": (
                            "SQLAlchemy URL; default sqlite under AIRFLOW_HOME. Use PostgreSQL "
                            "when several workers share it."
                        ),
                    },
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "login", "host"],
                    "relabeling": {"password": "Audit HMAC key (secret)"},
                    "placeholders": {},
                },
            },
        ],
    }
