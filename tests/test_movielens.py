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
        rated_before = set(ev["item_id"][int(rq["history_start"][r]) : end].tolist())
        assert not rated_before & set(items[~shown].tolist())
        assert not set(following.tolist()) & set(items[~shown].tolist())
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


def _write_truncated(root, cutoff: float) -> None:
    """MovieLens files in ``root`` with every rating at or after ``cutoff`` dropped."""
    root.mkdir()
    for name in ("ml-100k.item", "ml-100k.user"):
        (root / name).write_bytes((DEFAULT_ROOT / name).read_bytes())
    lines = (DEFAULT_ROOT / "ml-100k.inter").read_text(encoding="latin-1").splitlines()
    kept = [lines[0]] + [line for line in lines[1:] if float(line.split("\t")[3]) < cutoff]
    (root / "ml-100k.inter").write_text("\n".join(kept) + "\n", encoding="latin-1")


def test_negatives_existed_before_the_request(movielens: World) -> None:
    """Every negative had been rated by someone before the request time."""
    ev, rq, c = movielens.events, movielens.requests, movielens.candidates
    first_rating: dict[int, float] = {}
    for i, t in zip(ev["item_id"].tolist(), ev["timestamp"].tolist(), strict=True):
        first_rating[i] = min(t, first_rating.get(i, np.inf))
    shown = c["y_impression"].astype(bool)
    times = rq["request_time"][np.searchsorted(rq["request_id"], c["request_id"])]
    firsts = np.array([first_rating[int(i)] for i in c["item_id"][~shown]])
    assert np.all(firsts < times[~shown])


def test_negatives_never_use_future_information(movielens: World, tmp_path) -> None:
    """The same data cut at time T: every request whose positives all lie before T gets the
    very same candidates. Ratings after T (who rated what, how popular it became) are absent
    from the cut data, so they cannot have decided a negative in the full data either."""
    cutoff = float(np.quantile(movielens.events["timestamp"], 0.5))
    _write_truncated(tmp_path / "cut", cutoff)
    cut = load_movielens(tmp_path / "cut", n_next=N_NEXT, n_negatives=N_NEGATIVES)

    def by_slot(world: World) -> dict[tuple[int, int], tuple[list[int], list[int]]]:
        ev, rq, c = world.events, world.requests, world.candidates
        out = {}
        for r in range(world.n_requests):
            user, end = int(rq["user_id"][r]), int(rq["history_end"][r])
            user_end = int(np.searchsorted(ev["user_id"], user, side="right"))
            if end + N_NEXT > user_end or ev["timestamp"][end + N_NEXT - 1] >= cutoff:
                continue  # a positive lies after the cut: its label differs, not comparable
            rows = world.candidate_rows(r)
            past = end - int(rq["history_start"][r])  # event rows differ between the two worlds
            out[(user, past)] = (c["item_id"][rows].tolist(), c["y_impression"][rows].tolist())
        return out

    full, early = by_slot(movielens), by_slot(cut)
    assert len(early) > 1000
    assert early.keys() <= full.keys()
    assert all(full[key] == early[key] for key in early)
