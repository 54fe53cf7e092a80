"""Idempotency by event-id digest: what a store keeps to recognise a retried event.

A store does not keep event ids (strings of up to 128 bytes, ~97 B each in a Redis sorted set):
it keeps an 8-byte digest of each (BLAKE2b-64) and the second it was appended, for the last
``dedup_window`` events of a user and for ``dedup_seconds`` at most. An event whose digest is among
those remembered is a duplicate.

False duplicates: a new event is taken for a retry only if its digest equals one of the ≤ W
remembered, probability ≤ W / 2⁶⁴ per event (W = 512: 2.8 · 10⁻¹⁷). At 10⁸ users posting 10³
events a day (3.7 · 10¹³ events a year) that is one wrongly dropped event in about 900 years.
"""

from __future__ import annotations

import hashlib
import struct

DIGEST_BYTES = 8
STAMP_BYTES = 4
ENTRY_BYTES = DIGEST_BYTES + STAMP_BYTES
"""A remembered event: its digest, then the whole second it was appended (uint32, little-endian)."""


def event_digest(event_id: str) -> bytes:
    """The 8-byte digest a store remembers instead of ``event_id``."""
    return hashlib.blake2b(event_id.encode(), digest_size=DIGEST_BYTES).digest()


def entry(digest: bytes, stamp: int) -> bytes:
    """The packed entry of a digest appended at unix second ``stamp``."""
    return digest + struct.pack("<I", stamp)


def remembered(appended_at: int, now: int, dedup_seconds: int) -> bool:
    """Whether an entry stamped ``appended_at`` still counts at ``now`` (whole seconds): for
    ``dedup_seconds`` after the append, not at or past it. Stamp 0 is an empty slot."""
    return appended_at > 0 and now - appended_at < dedup_seconds


def unpack_entries(packed: bytes) -> list[tuple[bytes, int]]:
    """(digest, second appended) of each slot of a packed string of entries, empty slots
    included (stamp 0)."""
    return [
        (packed[at : at + DIGEST_BYTES], struct.unpack_from("<I", packed, at + DIGEST_BYTES)[0])
        for at in range(0, len(packed) - ENTRY_BYTES + 1, ENTRY_BYTES)
    ]
