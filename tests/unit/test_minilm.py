"""The optional ``minilm`` embedder (extra ``semantic``, which `make test` installs)."""

from __future__ import annotations

import numpy as np

from scheduler.embedders import create_embedder


def test_paraphrases_are_closer_than_unrelated_sentences() -> None:
    emb = create_embedder("minilm")
    v = emb.embed(["How do I reset my password?", "I forgot my password, how can I change it?",
                   "The recipe needs two cups of flour."])
    assert v.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-4)
    assert float(v[0] @ v[1]) > 0.6
    assert float(v[0] @ v[2]) < 0.3
