"""The behaviour log's binary record: fixed-size, so a user's log is one appendable byte string.

A record is (item_id int64, timestamp float64, action int32), little-endian, 20 bytes. A user's
log is the concatenation of its records in arrival order, so the log position of an event is its
byte offset / 20, and "the events after cursor c" is the byte range from 20·c: one GETRANGE in
Redis, one slice in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EVENT_RECORD = np.dtype([("item_id", "<i8"), ("timestamp", "<f8"), ("action", "<i4")])
RECORD_BYTES = EVENT_RECORD.itemsize


@dataclass(frozen=True)
class EventLog:
    """Events read from a user's log, sorted by timestamp (ties keep arrival order).

    ``end`` is the log length after the read: the cursor a state that folds these events has.
    """

    item_ids: np.ndarray  # (N,) int64
    actions: np.ndarray  # (N,) int64, indices into the store's action vocabulary (layout.py)
    timestamps: np.ndarray  # (N,) float64, unix seconds
    end: int
    positions: np.ndarray  # (N,) int64, log position of each event
    item_rows: np.ndarray | None = None
    """(N, F_item) feature rows of the events' items from the live catalogue, when resolved
    (:meth:`service.items.LiveCatalogue.with_item_rows`); None: the model's base catalogue."""

    def __len__(self) -> int:
        return len(self.item_ids)

    def select(self, mask: np.ndarray, end: int) -> EventLog:
        """The events where ``mask`` holds (order kept), as a log that ends at ``end``."""
        return EventLog(
            item_ids=self.item_ids[mask],
            actions=self.actions[mask],
            timestamps=self.timestamps[mask],
            end=end,
            positions=self.positions[mask],
            item_rows=None if self.item_rows is None else self.item_rows[mask],
        )


def pack_records(item_ids: np.ndarray, actions: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """(N,) structured EVENT_RECORD array of event columns."""
    records = np.empty(len(item_ids), dtype=EVENT_RECORD)
    records["item_id"] = item_ids
    records["timestamp"] = timestamps
    records["action"] = actions
    return records


def pack_record(item_id: int, action: int, timestamp: float) -> bytes:
    return pack_records(np.array([item_id]), np.array([action]), np.array([timestamp])).tobytes()


def unpack_log(data: bytes, end: int, start: int | None = None) -> EventLog:
    """Decode a byte range of whole records into an :class:`EventLog` sorted by timestamp.

    ``start`` is the log position of the first record; by default the range ends at ``end``.
    """
    whole = len(data) - len(data) % RECORD_BYTES
    records = np.frombuffer(data[:whole], dtype=EVENT_RECORD)
    first = end - len(records) if start is None else start
    order = np.argsort(records["timestamp"], kind="stable")
    records = records[order]
    return EventLog(
        item_ids=records["item_id"].astype(np.int64),
        actions=records["action"].astype(np.int64),
        timestamps=records["timestamp"].astype(np.float64),
        end=end,
        positions=first + order.astype(np.int64),
    )
