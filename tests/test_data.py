"""The world format and the pipeline from world tables to requests and batches."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from model.data import (
    LABEL_COLUMNS,
    World,
    batches,
    item_catalogue,
    load_world,
    oracle_auc,
    request_stream,
    request_truth,
    save_world,
    spec_for_world,
    user_history,
    user_profiles,
    validate_world,
)
from model.features import OBJECTIVES, OOV_INDEX, FeatureSpec
from model.world import generate_world


@pytest.fixture(scope="module")
def world() -> World:
    return generate_world("tiny", 0)


@pytest.fixture(scope="module")
def spec(world: World) -> FeatureSpec:
    return spec_for_world(world)


def test_save_and_load_round_trip(world: World, tmp_path) -> None:
    save_world(world, tmp_path)
    loaded = load_world(tmp_path)
    assert loaded.meta == world.meta | {"format_version": 1}
    for name in ("items", "users", "events", "requests", "candidates"):
        original, back = getattr(world, name), getattr(loaded, name)
        assert original.keys() == back.keys()
        for column in original:
            assert back[column].dtype == original[column].dtype, (name, column)
            np.testing.assert_array_equal(back[column], original[column])


def test_load_world_names_what_is_missing(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"world\.json"):
        load_world(tmp_path / "nowhere")


def test_validate_world_rejects_broken_histories(world: World) -> None:
    requests = dict(world.requests)
    requests["history_end"] = requests["history_end"] - 1  # drops an event it should see
    broken = World(
        meta=world.meta,
        items=world.items,
        users=world.users,
        events=world.events,
        requests=requests,
        candidates=world.candidates,
    )
    with pytest.raises(ValueError, match="stops before"):
        validate_world(broken)


def test_spec_is_sized_from_the_world(world: World, spec: FeatureSpec) -> None:
    card = world.cardinalities
    fields = {f.name: f for f in (*spec.item_fields, *spec.user_fields)}
    assert fields["category"].cardinality == card["n_categories"]
    assert len(fields["item_id"].known_ids) == card["n_items"]
    assert fields["item_id"].cardinality >= 16  # buckets for ids outside the catalogue
    assert {name: fields[name].cardinality for name in card["profile_cardinalities"]} == card[
        "profile_cardinalities"
    ]
    features = world.features(spec)
    assert world.features(spec) is features  # cached per spec
    assert not np.any(features.item_rows == OOV_INDEX)  # every known value has its own row
    assert not np.any(features.user_rows == OOV_INDEX)


def test_every_catalogue_id_has_a_row_of_its_own(world: World, spec: FeatureSpec) -> None:
    features = world.features(spec)
    for column, ids in ((0, world.items["item_id"]), (2, world.items["author"])):
        rows = features.item_rows[:, column]
        # One row per distinct id, and no row shared by two ids.
        pairs = np.unique(np.stack([ids, rows]), axis=1)
        assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]
    user_rows = features.user_rows[:, 0]
    assert len(np.unique(user_rows)) == len(world.users["user_id"])
    # An id outside the catalogue still gets a stable row, past the catalogue's rows.
    item_field = spec.item_fields[0]
    unseen = item_field.index(np.array([10**12, 10**12]))
    assert unseen[0] == unseen[1] >= 2 + len(item_field.known_ids)
    assert unseen[0] < item_field.rows


def test_requests_slice_the_events_table(world: World, spec: FeatureSpec) -> None:
    ev = world.events
    item_rows = world.features(spec).item_rows
    stream = request_stream(world, spec)
    for r, request in enumerate(itertools.islice(stream, 60)):
        user = world.requests["user_id"][r]
        request_time = world.requests["request_time"][r]
        assert request.request_time == request_time
        # Brute force: that user's events strictly before the request, oldest first.
        mine = np.flatnonzero((ev["user_id"] == user) & (ev["timestamp"] < request_time))
        np.testing.assert_array_equal(request.event_times, ev["timestamp"][mine])
        rows, _ = world.item_index(ev["item_id"][mine])
        expected = spec.event_rows(item_rows[rows], ev["action"][mine], ev["timestamp"][mine])
        np.testing.assert_array_equal(request.events, expected)
        cand = world.candidate_rows(r)
        cand_rows, _ = world.item_index(world.candidates["item_id"][cand])
        np.testing.assert_array_equal(request.candidates, item_rows[cand_rows])
        user_row, _ = world.user_index(np.array([user]))
        np.testing.assert_array_equal(request.user, world.features(spec).user_rows[user_row[0]])
        assert request.labels is not None
        expected_labels = np.stack([world.candidates[c][cand] for c in LABEL_COLUMNS], axis=1)
        np.testing.assert_array_equal(request.labels, expected_labels)
        assert request.labels.dtype == np.float32


def test_requests_come_in_time_order_and_see_growing_histories(world: World, spec) -> None:
    times = [r.request_time for r in request_stream(world, spec)]
    assert times == sorted(times) and len(times) == world.n_requests
    seen = world.requests["history_end"] - world.requests["history_start"]
    for user in np.unique(world.requests["user_id"]):
        mine = world.requests["user_id"] == user
        assert np.all(np.diff(seen[mine]) > 0)  # later requests of a user see more


def test_max_history_keeps_the_most_recent_events(world: World, spec: FeatureSpec) -> None:
    full = list(itertools.islice(request_stream(world, spec), 40))
    cut = list(itertools.islice(request_stream(world, spec, max_history=7), 40))
    for a, b in zip(full, cut, strict=True):
        assert len(b.events) == min(7, len(a.events))
        np.testing.assert_array_equal(b.events, a.events[len(a.events) - len(b.events) :])
        np.testing.assert_array_equal(b.event_times, a.event_times[-len(b.events) :])
        np.testing.assert_array_equal(b.candidates, a.candidates)


def test_batches_stream_in_order_with_truth(world: World, spec: FeatureSpec) -> None:
    rows = range(0, 23)
    got = list(batches(world, spec, 8, with_truth=True, request_rows=rows))
    assert [b.size for b, _ in got] == [8, 8, 7]
    requests = list(request_stream(world, spec, request_rows=rows))
    for i, (batch, truth) in enumerate(got):
        assert truth.shape == (*batch.candidate_mask.shape, len(OBJECTIVES))
        for j in range(batch.size):
            r = 8 * i + j
            m, n = len(requests[r].candidates), len(requests[r].events)
            assert batch.request_time[j].item() == requests[r].request_time
            assert int(batch.candidate_mask[j].sum()) == m and int(batch.event_mask[j].sum()) == n
            np.testing.assert_array_equal(batch.events[j, :n].numpy(), requests[r].events)
            assert batch.labels is not None
            np.testing.assert_array_equal(batch.labels[j, :m].numpy(), requests[r].labels)
            c = world.candidates
            cand = world.candidate_rows(r)
            np.testing.assert_allclose(truth[j, :m, 0], c["p_impression"][cand])
            np.testing.assert_allclose(
                truth[j, :m, 1], c["p_impression"][cand] * c["p_click"][cand], rtol=1e-6
            )
            np.testing.assert_array_equal(truth[j, m:], 0.0)
    plain = next(batches(world, spec, 8, max_history=5))
    assert plain.events.shape[1] <= 5


def test_request_truth_is_the_probability_of_each_label(world: World) -> None:
    truth = np.concatenate([request_truth(world, r) for r in range(world.n_requests)])
    labels = np.stack([world.candidates[c] for c in LABEL_COLUMNS], axis=1)
    # Calibration: on average the truth matches label frequencies.
    np.testing.assert_allclose(truth.mean(axis=0), labels.mean(axis=0), atol=0.01)
    assert np.all(truth[:, 1:] <= truth[:, :1] + 1e-7)  # joint ≤ impression


def test_oracle_auc_over_a_subset(world: World) -> None:
    everything = oracle_auc(world)
    assert set(everything) == set(OBJECTIVES)
    assert all(0.5 < v < 1.0 for v in everything.values())
    half = oracle_auc(world, request_rows=range(world.n_requests // 2))
    assert half != everything


def test_catalogue_and_histories_for_the_service(world: World) -> None:
    catalogue = item_catalogue(world)
    assert list(catalogue) == ["item_id", "category", "author"]  # no latent truth leaks out
    assert len(catalogue["item_id"]) == world.cardinalities["n_items"]
    assert list(user_profiles(world)) == ["user_id", "age_group", "gender", "region"]
    r = 5
    user, before = int(world.requests["user_id"][r]), float(world.requests["request_time"][r])
    history = user_history(world, user, before=before)
    rows = world.history_rows(r)
    np.testing.assert_array_equal(history["item_id"], world.events["item_id"][rows])
    np.testing.assert_array_equal(history["timestamp"], world.events["timestamp"][rows])
    everything = user_history(world, user)
    assert len(everything["item_id"]) == int(np.sum(world.events["user_id"] == user))


def test_unknown_items_get_id_rows_with_oov_attributes(world: World, spec: FeatureSpec) -> None:
    candidates = {k: v[: world.candidate_offsets[1]].copy() for k, v in world.candidates.items()}
    candidates["item_id"][0] = 10**12  # not in the catalogue
    one = World(
        meta=world.meta,
        items=world.items,
        users=world.users,
        events=world.events,
        requests={k: v[:1] for k, v in world.requests.items()},
        candidates=candidates,
    )
    request = next(request_stream(one, spec))
    names = spec.item_names
    assert request.candidates[0, names.index("category")] == OOV_INDEX
    assert request.candidates[0, names.index("item_id")] not in (OOV_INDEX, 0)


def test_candidates_are_regrouped_by_request(world: World) -> None:
    def with_candidates(candidates: dict[str, np.ndarray]) -> World:
        return World(
            meta=world.meta,
            items=world.items,
            users=world.users,
            events=world.events,
            requests=world.requests,
            candidates=candidates,
        )

    shuffled = {k: v[::-1].copy() for k, v in world.candidates.items()}
    regrouped = with_candidates(shuffled)
    np.testing.assert_array_equal(regrouped.candidate_offsets, world.candidate_offsets)
    for r in range(5):
        mine = regrouped.candidates["request_id"][regrouped.candidate_rows(r)]
        assert np.all(mine == world.requests["request_id"][r])
    shuffled["request_id"][0] = 10**9
    with pytest.raises(ValueError, match="absent from the requests"):
        with_candidates(shuffled)
