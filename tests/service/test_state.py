"""The state codec and the fold arithmetic, as pure functions."""

from __future__ import annotations

import pytest
import torch

from service.state import (
    StateFormatError,
    UserState,
    advance,
    decode_state,
    empty_state,
    encode_state,
    fold,
    state_bytes,
)


def random_state(heads: int = 4, dk: int = 16, dv: int = 16, cursor: int = 7) -> UserState:
    g = torch.Generator().manual_seed(0)
    return UserState(
        s=torch.randn(heads, dk, dv, generator=g),
        z=torch.rand(heads, dk, generator=g),
        cursor=cursor,
        reference_time=1.7e9 + 0.125,
    )


def test_codec_round_trips_exactly_and_fits_16_kib() -> None:
    state = random_state()
    blob = encode_state(state)
    assert len(blob) == state_bytes(4, 16, 16) <= 16 * 1024
    back = decode_state(blob, 4, 16, 16)
    assert torch.equal(back.s, state.s) and torch.equal(back.z, state.z)
    assert (back.cursor, back.reference_time) == (7, 1.7e9 + 0.125)


@pytest.mark.parametrize(
    "blob", [b"", b"short", encode_state(random_state(heads=2)), encode_state(random_state())[:-4]]
)
def test_foreign_blobs_are_refused(blob: bytes) -> None:
    with pytest.raises(StateFormatError):
        decode_state(blob, 4, 16, 16)


def test_folding_in_pieces_equals_one_sum_under_decay() -> None:
    rates = torch.tensor([1e-5, 2e-5, 0.0, 5e-6])
    g = torch.Generator().manual_seed(1)
    times = torch.tensor([100.0, 5000.0, 300.0, 20000.0, 7000.0], dtype=torch.float64)
    keys = torch.rand(5, 4, 16, generator=g)
    values = torch.randn(5, 4, 16, generator=g)

    def contribution(idx: list[int], reference: float) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.exp(-rates[None, :] * (reference - times[idx]).float()[:, None])  # (n, H)
        k = keys[idx] * w[..., None]
        return torch.einsum("nhk,nhv->hkv", k, values[idx]), k.sum(0)

    whole = contribution([0, 1, 2, 3, 4], 20000.0)
    state = fold(empty_state(4, 16, 16), contribution([0, 1], 5000.0), 5000.0, 2, rates)
    state = fold(state, contribution([3], 20000.0), 20000.0, 3, rates)
    # Arrive late: older than the reference, encoded relative to it.
    state = fold(state, contribution([2, 4], 20000.0), 20000.0, 5, rates)
    torch.testing.assert_close(state.s, whole[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.z, whole[1], rtol=1e-5, atol=1e-6)
    assert (state.cursor, state.reference_time) == (5, 20000.0)


def test_advance_never_moves_backwards_and_is_identity_without_decay() -> None:
    state = random_state()
    assert advance(state, state.reference_time - 100, torch.ones(4)) is state
    moved = advance(state, state.reference_time + 100, torch.zeros(4))
    assert moved.s is state.s and moved.reference_time == state.reference_time + 100
