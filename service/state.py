"""The cached user state: its binary codec and how new events fold into it.

A state is (S (H, dk, dv), z (H, dk)) discounted to ``reference_time``, plus the log positions
[start, cursor) of the events it contains (the history window). It is a sum over events
(DESIGN §2), so

* new events fold in as S ← e^{-λΔt}·S + contribution, where the state is first moved to the new
  reference time max(old reference, newest event), and the events are encoded relative to it;
* an event older than the reference (it arrived late) is simply encoded with its own weight
  e^{-λ(t_ref - t_j)} — the same weight a from-scratch encoding gives it;
* without decay (λ = 0) every weight is 1 and the above reduces to S += contribution;
* an event that leaves the window is folded out: its contribution, encoded relative to the
  state's reference time, is subtracted (the reference time stays; it only moves forward).

Every fold-in and fold-out rounds in float32, so a state that only ever folds drifts slowly
from its window's exact state; ``anchor`` (the window start of its last encoding from scratch)
lets the ranker re-encode it now and then (:data:`service.ranker.REENCODE_AFTER_WINDOWS`).

Wire format, little-endian: cursor int64, start int64, anchor int64, reference_time float64,
magic b"IFS2", H, dk, dv uint16, 2 pad bytes, then S and z as float32 (float16 would break the
1e-5 consistency the service promises). H = 4, dk = dv = 16 gives 48 + 4·(1024 + 64) = 4400
bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from model.linear_attention import advance_state, fold_in, fold_out

_HEADER = struct.Struct("<qqqd4sHHH2x")
_MAGIC = b"IFS2"


class StateFormatError(ValueError):
    """A cached blob is not a state of the expected shape (another model, a corrupt value)."""


class NonFiniteState(StateFormatError):
    """A cached blob decodes, but to NaN or infinite values."""


@dataclass(frozen=True)
class UserState:
    s: Tensor  # (H, dk, dv) float32
    z: Tensor  # (H, dk) float32
    cursor: int
    """Log events folded in: positions [0, cursor) of the user's behaviour log."""
    reference_time: float
    """Unix seconds the decay weights are relative to (the newest folded event)."""
    start: int = 0
    """First log position of the window the state covers; events before it were folded out."""
    anchor: int = 0
    """Window start when the state was last encoded from scratch (folds since then add error)."""


def empty_state(heads: int, key_dim: int, value_dim: int) -> UserState:
    return UserState(
        s=torch.zeros(heads, key_dim, value_dim),
        z=torch.zeros(heads, key_dim),
        cursor=0,
        reference_time=0.0,
    )


def encode_state(state: UserState) -> bytes:
    h, dk, dv = state.s.shape
    header = _HEADER.pack(
        state.cursor, state.start, state.anchor, state.reference_time, _MAGIC, h, dk, dv
    )
    s = state.s.detach().to(torch.float32).contiguous().numpy().astype("<f4", copy=False)
    z = state.z.detach().to(torch.float32).contiguous().numpy().astype("<f4", copy=False)
    return header + s.tobytes() + z.tobytes()


def decode_state(blob: bytes, heads: int, key_dim: int, value_dim: int) -> UserState:
    """Parse a blob; raises :class:`StateFormatError` unless it is a well-formed state of exactly
    these dimensions: finite values, 0 ≤ anchor ≤ start ≤ cursor, a finite reference time."""
    if len(blob) < _HEADER.size:
        raise StateFormatError(f"state blob of {len(blob)} bytes is shorter than its header")
    cursor, start, anchor, reference_time, magic, h, dk, dv = _HEADER.unpack_from(blob)
    if magic != _MAGIC or (h, dk, dv) != (heads, key_dim, value_dim):
        raise StateFormatError(
            f"state blob {magic!r} of shape {(h, dk, dv)}; expected {(heads, key_dim, value_dim)}"
        )
    n_s, n_z = h * dk * dv, h * dk
    if len(blob) != _HEADER.size + 4 * (n_s + n_z):
        raise StateFormatError(f"state blob of {len(blob)} bytes has the wrong length")
    if not 0 <= anchor <= start <= cursor:
        raise StateFormatError(f"state window [{start}, {cursor}) from {anchor} is not a window")
    values = np.frombuffer(blob, dtype="<f4", offset=_HEADER.size).astype(np.float32)
    if not (np.isfinite(values).all() and np.isfinite(reference_time)):
        raise NonFiniteState("state holds non-finite values")
    return UserState(
        s=torch.from_numpy(values[:n_s].reshape(h, dk, dv)),
        z=torch.from_numpy(values[n_s:].reshape(h, dk)),
        cursor=int(cursor),
        reference_time=float(reference_time),
        start=int(start),
        anchor=int(anchor),
    )


def is_finite(state: UserState) -> bool:
    """Whether S and z hold only finite values (a state to cache, or to throw away)."""
    return bool(torch.isfinite(state.s).all() and torch.isfinite(state.z).all())


def state_bytes(heads: int, key_dim: int, value_dim: int) -> int:
    """Size of an encoded state."""
    return _HEADER.size + 4 * heads * key_dim * (value_dim + 1)


def advance(state: UserState, to_time: float, decay_rates: Tensor) -> UserState:
    """The same state discounted to a later reference time (never moved backwards).

    decay_rates (H,) per second; all zeros means no decay and the tensors are returned as they are.
    """
    if to_time <= state.reference_time:
        return state
    if not bool(torch.any(decay_rates != 0)):
        return replace(state, reference_time=to_time)
    elapsed = torch.tensor([to_time - state.reference_time], dtype=torch.float64)
    s, z = advance_state((state.s[None], state.z[None]), elapsed, decay_rates)
    return replace(state, s=s[0], z=z[0], reference_time=to_time)


def fold(
    state: UserState,
    contribution: tuple[Tensor, Tensor],
    contribution_time: float,
    cursor: int,
    decay_rates: Tensor,
) -> UserState:
    """Add events' contribution, encoded relative to ``contribution_time``, to a state.

    ``contribution_time`` must be max(state.reference_time, newest event time), the reference
    :func:`fold_reference_time` gives; the result has that reference time and ``cursor``.
    """
    moved = advance(state, contribution_time, decay_rates)
    s, z = fold_in((moved.s, moved.z), contribution)
    return replace(moved, s=s, z=z, cursor=cursor, reference_time=contribution_time)


def unfold(state: UserState, contribution: tuple[Tensor, Tensor], start: int) -> UserState:
    """Remove evicted events' contribution, encoded relative to ``state.reference_time``; the
    window then starts at ``start``. The reference time stays: the state is still discounted to
    it, and the decay weights of the events kept do not change."""
    s, z = fold_out((state.s, state.z), contribution)
    return replace(state, s=s, z=z, start=start)


def fold_reference_time(state: UserState, event_times: np.ndarray) -> float:
    """The reference time after folding events: the newest of the state's and the events'."""
    newest = float(np.max(event_times)) if len(event_times) else state.reference_time
    return max(state.reference_time, newest)
