"""MovieLens 100K loads into the same world format as the synthetic worlds."""

from __future__ import annotations

import numpy as np
import pytest

from model.data import (
    World,
    load_world,
    oracle_auc,
    request_stream,
    save_world,
    spec_for_world,
    validate_world,
)
from model.features import ACTIONS, OOV_INDEX
from model.movielens import DEFAULT_ROOT, GENRES, load_movielens, movielens_root

N_NEXT, N_NEGATIVES = 5, 20


@pytest.fixture(scope="module")
def movielens() -> World:
    try:
        movielens_root()
    except FileNotFoundError as missing:
        pytest.skip(f"MovieLens 100K is not beside the repository: {missing}")
    return load_movielens(n_next=N_NEXT, n_negatives=N_NEGATIVES)


def _ratings() -> dict[tuple[int, int], int]:
    """(user, item) -> rating, straight from the raw file."""
    lines = (DEFAULT_ROOT / "ml-100k.inter").read_text().splitlines()[1:]
    return {(int(u), int(i)): int(float(r)) for u, i, r, _ in (line.split("\t") for line in lines)}


def test_missing_data_names_where_it_looked(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_movielens(tmp_path)


def test_sizes_and_format(movielens: World) -> None:
    validate_world(movielens)  # sorted, strictly increasing per user, histories before requests
    assert len(movielens.users["user_id"]) == 943
    assert len(movielens.items["item_id"]) == 1682
    assert len(movielens.events["user_id"]) == 100_000
    assert set(np.unique(movielens.events["action"])) == set(range(len(ACTIONS)))
    assert movielens.items["category"].max() < len(GENRES)
    assert not movielens.has_truth
    with pytest.raises(ValueError, match="no ground-truth"):
        oracle_auc(movielens)


def test_events_follow_the_documented_mapping(movielens: World) -> None:
    ratings = _ratings()
    ev = movielens.events
    rating = np.array([ratings[(u, i)] for u, i in zip(ev["user_id"], ev["item_id"], strict=True)])
    action = ev["action"]
    assert np.all((action == ACTIONS.index("like")) == (rating == 5))
    assert np.all((action == ACTIONS.index("impression")) == (rating <= 3))
    # Tie-breaking moves no rating by more than a second.
    assert np.all(ev["timestamp"] - np.floor(ev["timestamp"]) < 1.0)


def test_candidates_are_next_ratings_plus_unrated_items(movielens: World) -> None:
    ratings = _ratings()
    ev, rq, c = movielens.events, movielens.requests, movielens.candidates
    assert np.all(rq["history_end"] - rq["history_start"] >= 10)
    for r in np.random.default_rng(0).choice(movielens.n_requests, 200, replace=False):
        user, end = int(rq["user_id"][r]), int(rq["history_end"][r])
        rows = movielens.candidate_rows(int(r))
        items, shown = c["item_id"][rows], c["y_impression"][rows].astype(bool)
        user_end = int(np.searchsorted(ev["user_id"], user, side="right"))
        following = ev["item_id"][end : min(end + N_NEXT, user_end)]
        assert sorted(items[shown]) == sorted(following)
        assert all((user, int(i)) not in ratings for i in items[~shown])
        assert (~shown).sum() == N_NEGATIVES
        for i, clicked, liked in zip(
            items[shown], c["y_click"][rows][shown], c["y_like"][rows][shown], strict=True
        ):
            assert bool(clicked) == (ratings[(user, int(i))] >= 4)
            assert bool(liked) == (ratings[(user, int(i))] == 5)
        for name in ("y_click", "y_long_view", "y_like"):
            assert not c[name][rows][~shown].any()


def test_round_trip_and_featurise(movielens: World, tmp_path) -> None:
    save_world(movielens, tmp_path)
    loaded = load_world(tmp_path)
    np.testing.assert_array_equal(loaded.events["timestamp"], movielens.events["timestamp"])
    np.testing.assert_array_equal(loaded.candidates["y_click"], movielens.candidates["y_click"])
    assert list(loaded.items["title"][:2]) == ["Toy Story", "GoldenEye"]
    spec = spec_for_world(loaded)
    assert "occupation" in spec.user_names
    request = next(request_stream(loaded, spec))
    assert request.candidates.shape == (N_NEXT + N_NEGATIVES, len(spec.item_fields))
    assert request.labels is not None and request.labels[:, 0].sum() == N_NEXT
    assert (
        request.events.shape[0]
        == loaded.requests["history_end"][0] - loaded.requests["history_start"][0]
    )
    # Known genres never hit OOV; unknown release years do.
    rows = loaded.features(spec).item_rows
    assert not np.any(rows[:, spec.item_names.index("category")] == OOV_INDEX)
    unknown_year = loaded.items["author"] < 0
    assert 0 < unknown_year.sum() < 5
    assert np.all((rows[:, spec.item_names.index("author")] == OOV_INDEX) == unknown_year)
