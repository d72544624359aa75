"""Vocabulary fingerprint: both sides must map ids to the same tokens, or drafts are meaningless."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping


def vocab_fingerprint(vocab: Mapping[str, int]) -> str:
    """Hex sha256 (128 bits) of the id -> token mapping, as given by ``tokenizer.get_vocab()``.

    Entries are hashed in id order as (id, token) with length-prefixed UTF-8, so the result does not
    depend on dict order and no token text can be confused with a separator.
    """
    items = sorted((int(i), str(t)) for t, i in vocab.items())
    digest = hashlib.sha256(b"tslt-vocab-v1")
    digest.update(len(items).to_bytes(8, "little"))
    for token_id, token in items:
        raw = token.encode("utf-8", "surrogatepass")
        digest.update(token_id.to_bytes(8, "little", signed=True))
        digest.update(len(raw).to_bytes(8, "little"))
        digest.update(raw)
    return digest.hexdigest()[:32]
