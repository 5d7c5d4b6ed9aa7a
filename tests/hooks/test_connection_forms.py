"""Connection forms on Airflow 3.1 come from the hooks, derived from the same provider info 3.2+ reads.

The forms themselves are checked on Airflow 3.1 by the compatibility suite (tests/compat, through the API
server's hook metadata); here: the translation, and that on this Airflow the hooks leave the deprecated
methods out.
"""

from __future__ import annotations

import json

import pytest
from airflow.providers.common.compat.version_compat import AIRFLOW_V_3_2_PLUS

from governed_ai.get_provider_info import get_provider_info
from governed_ai.hooks.chroma import ChromaHook
from governed_ai.hooks.connection_forms import (
    decode_json_fields,
    json_typed_fields,
    legacy_field_behaviour,
)
from governed_ai.hooks.governance import GovernanceHook
from governed_ai.hooks.llm import LLMHook


@pytest.mark.parametrize("hook", [LLMHook, ChromaHook, GovernanceHook])
def test_the_deprecated_form_methods_exist_only_where_airflow_needs_them(hook: type) -> None:
    # Airflow 3.2+ warns about these methods when a hook defines them; 3.1 reads nothing else.
    assert ("get_connection_form_widgets" in hook.__dict__) is not AIRFLOW_V_3_2_PLUS
    assert ("get_ui_field_behaviour" in hook.__dict__) is not AIRFLOW_V_3_2_PLUS


def test_the_3_1_field_behaviour_is_the_declared_one_in_3_1_spelling() -> None:
    (declared,) = [
        c for c in get_provider_info()["connection-types"] if c["connection-type"] == "governed_ai_llm"
    ]

    behaviour = legacy_field_behaviour("governed_ai_llm")()

    assert behaviour["hidden_fields"] == declared["ui-field-behaviour"]["hidden-fields"]
    assert behaviour["relabeling"] == {"host": "Base URL", "password": "API key"}
    assert behaviour["placeholders"] == declared["ui-field-behaviour"]["placeholders"]


def test_json_fields_stored_as_text_by_a_3_1_form_are_parsed() -> None:
    prices = {"gpt-4o-mini*": {"input_per_1m_tokens": 0.15, "output_per_1m_tokens": 0.6}}

    assert json_typed_fields("governed_ai_llm") == frozenset({"prices"})
    decoded = decode_json_fields("governed_ai_llm", {"prices": json.dumps(prices), "timeout": "30"})
    assert decoded == {"prices": prices, "timeout": "30"}  # only JSON-typed fields are decoded
    assert decode_json_fields("governed_ai_llm", {"prices": "{not json"}) == {"prices": "{not json"}


def test_an_llm_connection_made_by_a_3_1_form_reads_like_any_other(monkeypatch: pytest.MonkeyPatch) -> None:
    prices = {"fake-*": {"input_per_1m_tokens": 1.0, "output_per_1m_tokens": 2.0}}
    extra = {"default_model": "fake-model", "timeout": "30", "max_retries": 1, "prices": json.dumps(prices)}
    monkeypatch.setenv(
        "AIRFLOW_CONN_FORM_LLM",
        json.dumps({"conn_type": "governed_ai_llm", "host": "http://127.0.0.1:9/v1", "extra": extra}),
    )

    settings = LLMHook(llm_conn_id="form_llm").settings

    assert settings.timeout == 30.0
    assert settings.prices.cost("fake-model", 1_000_000, 1_000_000) == pytest.approx(3.0)
