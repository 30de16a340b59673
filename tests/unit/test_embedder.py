"""The default embedder: unit vectors; shared templates close, unrelated prompts apart."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler.embedders import HashedEmbedder, create_embedder

TEMPLATE = ("You are a support assistant for a cloud storage company. Answer in two "
            "sentences. Customer question: ")


def test_vectors_are_unit_length_and_deterministic() -> None:
    emb = HashedEmbedder(dim=128)
    texts = ["hello world", "ünïcödé ✓ text", "a", "", TEMPLATE + "where is my file?"]
    v1, v2 = emb.embed(texts), emb.embed(texts)
    assert v1.shape == (5, 128) and v1.dtype == np.float32
    np.testing.assert_array_equal(v1, v2)
    norms = np.linalg.norm(v1, axis=1)
    np.testing.assert_allclose(norms[[0, 1, 4]], 1.0, rtol=1e-5)
    assert norms[3] == 0.0  # an empty text has no features
    assert emb.embed([]).shape == (0, 128)


def test_prompts_sharing_a_template_are_closer_than_unrelated_ones() -> None:
    emb = HashedEmbedder()
    v = emb.embed([TEMPLATE + "How do I restore a deleted folder?",
                   TEMPLATE + "Can I pay by invoice instead of card?",
                   "Write a limerick about a cat who learns to play chess.",
                   "Translate to German: the train leaves at noon."])
    same_template = float(v[0] @ v[1])
    unrelated = max(float(v[0] @ v[2]), float(v[0] @ v[3]), float(v[2] @ v[3]))
    assert same_template > 0.7
    assert unrelated < 0.4


def test_batch_embedding_equals_one_by_one() -> None:
    emb = HashedEmbedder()
    texts = [TEMPLATE + str(i) for i in range(5)] + ["short", "x" * 3000]
    together = emb.embed(texts)
    alone = np.vstack([emb.embed([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-6)


def test_unknown_embedder_name_is_refused() -> None:
    with pytest.raises(ValueError, match="Unknown embedder"):
        create_embedder("word2vec")
