"""Embedders: turn prompts into unit vectors so that alike prompts land close together.

``hashed`` (the default) needs numpy only: the first bytes of each prompt are cut into
character 3- and 5-grams, hashed into ``dim`` signed buckets and weighted by position
(early bytes count more), so prompts that share a template, a system prompt or a
document prefix get a high cosine similarity. ``minilm`` embeds meaning with
all-MiniLM-L6-v2 (int8, onnxruntime), loaded from site-packages; it needs the
``semantic`` extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Protocol

import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]


class EmbedderName(StrEnum):
    """Embedders that can be chosen by the ``embedder`` setting."""

    HASHED = "hashed"  #: numpy character n-grams, no model files
    MINILM = "minilm"  #: all-MiniLM-L6-v2 int8 through onnxruntime


class Embedder(Protocol):
    """Maps texts to L2-normalised float32 vectors of ``dim`` dimensions."""

    dim: int

    def embed(self, texts: Sequence[str]) -> Vectors:
        """One row per text, each of unit length (an all-zero text stays zero)."""
        ...


_M1 = np.uint32(0x9E3779B1)
_M2 = np.uint32(0x85EBCA77)
_M3 = np.uint32(0xC2B2AE3D)


class HashedEmbedder:
    """Signed feature hashing of position-weighted character n-grams (numpy only).

    Each byte position of a prompt's first ``head_bytes`` bytes yields a 3-gram and a
    5-gram feature, weighted ``1/sqrt(1 + position/decay_bytes)``.
    """

    def __init__(self, dim: int = 256, head_bytes: int = 1024, decay_bytes: float = 256.0) -> None:
        if not 16 <= dim <= 65536:
            raise ValueError(f"dim must be between 16 and 65536, got {dim}")
        self.dim = dim
        self.head_bytes = head_bytes
        self._weights = (1.0 / np.sqrt(1.0 + np.arange(head_bytes) / decay_bytes)).astype(
            np.float32)

    def embed(self, texts: Sequence[str]) -> Vectors:
        n = len(texts)
        out = np.zeros((n, self.dim), dtype=np.float32)
        head = self.head_bytes
        chunks = [t.encode("utf-8", "replace")[:head] for t in texts]
        lens = np.fromiter(map(len, chunks), dtype=np.int64, count=n)
        m = int(lens.sum())
        if m == 0:
            return out
        # Four bytes of padding: every position has a full 5-gram window to read.
        b = np.frombuffer(b"".join(chunks) + b"\0\0\0\0", dtype=np.uint8).astype(np.uint32)
        starts = np.cumsum(lens) - lens
        doc = np.repeat(np.arange(n, dtype=np.int64), lens)
        pos = np.arange(m, dtype=np.int64) - np.repeat(starts, lens)
        left = np.repeat(lens, lens) - pos  # bytes from here to the end of the text
        gram3 = (b[:m] << 16) | (b[1:m + 1] << 8) | b[2:m + 2]
        h3 = gram3 * _M1
        h5 = (h3 ^ (((b[3:m + 3] << 8) | b[4:m + 4]) * _M2)) * _M3
        weight = self._weights[pos]
        dim = np.uint32(self.dim)
        idx = np.empty(2 * m, dtype=np.int64)
        wts = np.empty(2 * m, dtype=np.float32)
        for k, (h, g) in enumerate(((h3, 3), (h5, 5))):
            bucket = ((h >> np.uint32(16)) * dim) >> np.uint32(16)
            sign = 1.0 - 2.0 * ((h >> np.uint32(15)) & np.uint32(1)).astype(np.float32)
            idx[k * m:(k + 1) * m] = doc * self.dim + bucket
            wts[k * m:(k + 1) * m] = sign * weight * (left >= g)
        acc = np.bincount(idx, weights=wts, minlength=n * self.dim)
        out[:] = acc.reshape(n, self.dim)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out


def create_embedder(name: str, *, dim: int = 256) -> Embedder:
    """Build the embedder called ``name``."""
    try:
        chosen = EmbedderName(name)
    except ValueError:
        raise ValueError(f"Unknown embedder: {name!r}; choose one of "
                         f"{', '.join(e.value for e in EmbedderName)}") from None
    if chosen is EmbedderName.HASHED:
        return HashedEmbedder(dim=dim)
    from scheduler.minilm import MiniLMEmbedder

    embedder: Embedder = MiniLMEmbedder()
    return embedder
