"""The synthetic world: deterministic by seed, and every DESIGN §4 effect exists and matters."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from model.data import World, load_world, oracle_auc, validate_world
from model.features import ACTIONS, OBJECTIVES
from model.metrics import roc_auc
from model.world import (
    PRESETS,
    RECENCY_TRUTH,
    SOURCES,
    STUDY_PRESETS,
    ItemAttributes,
    Relevance,
    TruthParams,
    _make_users,
    action_logits,
    generate_world,
    impression_probabilities,
    main,
    policy_scores,
    relevance,
    request_action_probabilities,
    truth_params,
)

K = 50  # the sub-sequence length of the paper's SIM/TWIN comparison


@pytest.fixture(scope="module")
def tiny() -> World:
    return generate_world("tiny", 0)


@pytest.fixture(scope="module")
def small() -> World:
    return generate_world("small", 0)


def _same_tables(a: World, b: World) -> bool:
    for name in ("items", "users", "events", "requests", "candidates"):
        ta, tb = getattr(a, name), getattr(b, name)
        if ta.keys() != tb.keys():
            return False
        if not all(np.array_equal(ta[c], tb[c], equal_nan=True) for c in ta):
            return False
    return True


def _sample_rows(world: World, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(world.n_requests, size=min(n, world.n_requests), replace=False))


def _request_view(world: World, r: int) -> tuple[ItemAttributes, np.ndarray, ItemAttributes]:
    history = world.history_rows(r)
    event_items, _ = world.item_index(world.events["item_id"][history])
    cand_items, _ = world.item_index(world.candidates["item_id"][world.candidate_rows(r)])
    return (
        ItemAttributes.of(world.items, event_items),
        world.events["action"][history],
        ItemAttributes.of(world.items, cand_items),
    )


def _traits(world: World, r: int) -> tuple[float, float]:
    user, _ = world.user_index(world.requests["user_id"][r : r + 1])
    return float(world.users["appetite"][user[0]]), float(world.users["depth"][user[0]])


# -- determinism, format, consistency -------------------------------------------------------


def test_deterministic_by_seed(tiny: World) -> None:
    assert _same_tables(tiny, generate_world("tiny", 0))
    assert not _same_tables(tiny, generate_world("tiny", 1))


def test_cli_writes_the_same_world_as_memory(tiny: World, tmp_path, capsys) -> None:
    main(["--preset", "tiny", "--seed", "0", "--out", str(tmp_path), "--no-progress"])
    summary = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert summary["requests"] == tiny.n_requests and "oracle_auc" in summary
    on_disk = load_world(tmp_path)
    assert _same_tables(on_disk, tiny)
    assert on_disk.meta["preset"] == "tiny" and on_disk.meta["has_truth"]


def test_tables_are_well_formed(small: World) -> None:
    validate_world(small)
    ev, c = small.events, small.candidates
    assert set(np.unique(ev["action"])) == set(range(len(ACTIONS)))
    assert set(np.unique(c["source"])) == set(range(len(SOURCES)))
    for name in OBJECTIVES[1:]:  # an action implies an impression
        assert np.all(c[f"y_{name}"] <= c["y_impression"])
    m = small.meta["sizes"]["candidates_per_request"]
    assert np.all(np.diff(small.candidate_offsets) == m)
    items = c["item_id"].reshape(-1, m)
    assert all(len(np.unique(row)) == m for row in items[:500])  # candidate sets are sets
    n_shown = PRESETS["small"].n_shown
    # Each policy draw shows exactly n_shown, so p_impression sums to n_shown per request.
    np.testing.assert_allclose(c["p_impression"].reshape(-1, m).sum(1), n_shown, rtol=1e-5)
    assert np.all(c["y_impression"].reshape(-1, m).sum(1) == n_shown)


def test_saved_probabilities_match_the_formula(small: World) -> None:
    for r in _sample_rows(small, 40):
        rows = small.candidate_rows(int(r))
        saved = np.stack([small.candidates[f"p_{a}"][rows] for a in OBJECTIVES[1:]], axis=1)
        np.testing.assert_allclose(request_action_probabilities(small, int(r)), saved, rtol=1e-5)


def test_oracle_auc_is_informative_but_not_perfect(small: World) -> None:
    auc = oracle_auc(small)
    assert set(auc) == set(OBJECTIVES)
    for name, value in auc.items():
        assert 0.7 < value < 0.99, (name, value)


# -- DESIGN §4 effects ----------------------------------------------------------------------


def test_topics_cut_across_categories(small: World) -> None:
    items = small.items
    categories_per_topic = [
        len(np.unique(items["category"][items["topic"] == t])) for t in np.unique(items["topic"])
    ]
    assert np.mean(categories_per_topic) >= 3
    # Of the history events that share a candidate's topic, most lie in other categories.
    same_topic = other_category = 0
    for r in _sample_rows(small, 200):
        history, _, cands = _request_view(small, int(r))
        same = history.topic[:, None] == cands.topic[None, :]
        same_topic += same.sum()
        other_category += (same & (history.category[:, None] != cands.category[None, :])).sum()
    assert other_category / same_topic > 0.4


def test_cross_category_relevance_matters(small: World) -> None:
    full, within, clicks = [], [], []
    for r in _sample_rows(small, 800):
        rows = small.candidate_rows(int(r))
        shown = small.candidates["y_impression"][rows].astype(bool)
        full.append(request_action_probabilities(small, int(r))[shown, 0])
        within.append(request_action_probabilities(small, int(r), cross_category=False)[shown, 0])
        clicks.append(small.candidates["y_click"][rows][shown])
    p_full, p_within, y = np.concatenate(full), np.concatenate(within), np.concatenate(clicks)
    assert np.abs(p_full - p_within).mean() > 0.02
    # Knowing only same-category behaviour predicts clicks visibly worse.
    assert roc_auc(y, p_full) > roc_auc(y, p_within) + 0.02


def test_profile_shapes_traits_that_the_history_reveals(small: World) -> None:
    users = small.users
    appetite = users["appetite"]
    # Profile explains part of the trait (least squares on one-hot profile fields) ...
    onehot = np.concatenate(
        [np.eye(int(users[f].max()) + 1)[users[f]] for f in ("age_group", "gender", "region")],
        axis=1,
    )
    fit = onehot @ np.linalg.lstsq(onehot, appetite, rcond=None)[0]
    residual = appetite - fit
    assert 1 - residual.var() / appetite.var() > 0.1
    # ... and the category mix of the whole history reveals the hidden rest.
    rows, _ = small.item_index(small.events["item_id"])
    n_categories = small.cardinalities["n_categories"]
    counts = np.zeros((len(users["user_id"]), n_categories))
    np.add.at(counts, (small.events["user_id"], small.items["category"][rows]), 1.0)
    mix = counts / counts.sum(axis=1, keepdims=True)
    revealed = mix @ np.asarray(small.meta["category_loadings"]["appetite"])
    assert np.corrcoef(revealed, residual)[0, 1] > 0.3
    # The traits move every candidate's probabilities, related to it or not.
    deltas = [
        np.abs(
            request_action_probabilities(small, int(r))
            - request_action_probabilities(small, int(r), use_traits=False)
        ).mean()
        for r in _sample_rows(small, 100)
    ]
    assert np.mean(deltas) > 0.01


def test_more_same_category_relevant_items_than_k(small: World) -> None:
    params = truth_params(small)
    over, changes = [], []
    for r in _sample_rows(small, 400):
        history, actions, cands = _request_view(small, int(r))
        appetite, depth = _traits(small, int(r))
        full = action_logits(
            relevance(history, actions, cands, params), cands, appetite, depth, params
        )
        for category in np.unique(cands.category):
            in_category = np.flatnonzero(history.category == category)
            mine = cands.category == category
            related = history.cluster[in_category][:, None] == cands.cluster[mine][None, :]
            crowded = related.sum(axis=0) > K
            over.append(crowded)
            if not crowded.any():
                continue
            # What a category GSU keeping the most recent K leaves of the history.
            keep = in_category[-K:]
            sub = history.take(keep)
            cut = action_logits(
                relevance(sub, actions[keep], cands, params), cands, appetite, depth, params
            )
            p_full = 1 / (1 + np.exp(-full[mine][crowded, 0]))
            p_cut = 1 / (1 + np.exp(-cut[mine][crowded, 0]))
            changes.append(np.abs(p_full - p_cut))
    assert np.concatenate(over).mean() > 0.05
    assert np.concatenate(changes).mean() > 0.02


def test_impressions_depend_on_the_other_candidates() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=40)
    scores[0] = 1.0
    p_before, shown = impression_probabilities(scores, 5, 1.0, 2000, rng)
    assert shown.sum() == 5 and np.isclose(p_before.sum(), 5)
    stronger = scores.copy()
    stronger[1:6] = 3.0  # swap in five strong rivals; item 0 is unchanged
    p_after, _ = impression_probabilities(stronger, 5, 1.0, 2000, rng)
    assert p_after[0] < p_before[0] - 0.1


def test_impressions_in_the_world_follow_the_set(small: World) -> None:
    # Given an item's own policy score, stronger rivals in its set lower its p_impression.
    n_shown, params = PRESETS["small"].n_shown, truth_params(small)
    own, bar, p_imp = [], [], []
    for r in _sample_rows(small, 400):
        rows = small.candidate_rows(int(r))
        p_click = request_action_probabilities(small, int(r))[:, 0]
        items, _ = small.item_index(small.candidates["item_id"][rows])
        scores = policy_scores(
            np.log(p_click / (1 - p_click)), small.items["popularity"][items], params
        )
        own.append(scores)
        bar.append(np.full(len(scores), np.sort(scores)[-n_shown]))  # the score to beat
        p_imp.append(small.candidates["p_impression"][rows])
    own_score, to_beat, p = np.concatenate(own), np.concatenate(bar), np.concatenate(p_imp)
    # Items with about the same own score are shown less often in sets with a higher bar.
    band = np.abs(own_score - np.median(to_beat)) < 0.5
    high = to_beat > np.median(to_beat[band])
    assert p[band & high].mean() < 0.8 * p[band & ~high].mean()


def test_history_lengths_are_heavy_tailed_and_requests_interleave(small: World) -> None:
    lengths = np.bincount(small.events["user_id"])
    assert lengths.max() / np.median(lengths) > 8
    assert lengths.mean() > 1.3 * np.median(lengths)
    rq = small.requests
    seen = rq["history_end"] - rq["history_start"]
    for user in np.unique(rq["user_id"])[:200]:
        mine = seen[rq["user_id"] == user]
        assert len(np.unique(mine)) == len(mine)  # each request of a user sees a different history
    # Some requests see only part of their user's history (requests sit inside timelines).
    ends = np.cumsum(lengths)
    assert np.mean(rq["history_end"] < ends[rq["user_id"]]) > 0.5


def test_presets_cover_the_sizes_the_experiments_need() -> None:
    assert PRESETS["tiny"].n_users <= 200
    medium = PRESETS["medium"]
    assert medium.history_max >= 10_000 and medium.n_candidates == 100
    assert PRESETS["large"].history_max >= 20_000
    for preset in PRESETS.values():
        assert preset.n_items >= 2 * preset.n_candidates
        assert preset.n_shown < preset.n_candidates


# -- the fair study's presets ----------------------------------------------------------------


def test_study_worlds_differ_only_in_how_relevance_depends_on_the_history() -> None:
    worlds = {name: STUDY_PRESETS[name] for name in STUDY_PRESETS if name != "study_long"}
    sizes = {replace(p, name="", truth=TruthParams()) for p in worlds.values()}
    assert len(sizes) == 1  # same users, items, lengths and candidates
    assert STUDY_PRESETS["study_count"].truth.volume_exponent == 0.0
    assert STUDY_PRESETS["study_mixed"].truth == TruthParams()  # today's truth, ν = 0.5
    assert STUDY_PRESETS["study_share"].truth.volume_exponent == 1.0
    assert all(name in PRESETS for name in STUDY_PRESETS)


def _relevance(topic: float, recent: float, total: float = 200.0) -> Relevance:
    one = np.ones(1)
    return Relevance(
        topic_engagement=topic * one,
        category_engagement=topic * one,
        total_engagement=total * one,
        recent_topic_share=recent * one,
        author_affinity=0 * one,
    )


def test_recency_world_is_decided_by_the_last_events() -> None:
    """Moving the last-20 share from 0 to 1 moves every action more than a tenfold whole-history
    engagement does under the recency truth; under today's truth it is the other way round."""
    zeros = np.zeros(1)
    items = ItemAttributes(
        topic=zeros.astype(int), cluster=zeros.astype(int), category=zeros.astype(int),
        author=zeros.astype(int), quality=zeros, watchability=zeros, popularity=np.ones(1),
    )  # fmt: skip

    def effects(params: TruthParams) -> tuple[np.ndarray, np.ndarray]:
        def logits(topic: float, recent: float) -> np.ndarray:
            return action_logits(_relevance(topic, recent), items, 0.0, 0.0, params)[0]

        recent = logits(10.0, 1.0) - logits(10.0, 0.0)
        count = logits(100.0, 0.0) - logits(10.0, 0.0)
        return recent, count

    recent, count = effects(RECENCY_TRUTH)
    assert np.all(recent > count)
    recent, count = effects(TruthParams())
    assert np.all(recent[1:] < count[1:])  # today: long views and likes ignore recency


def test_long_world_has_lifelong_histories() -> None:
    preset = STUDY_PRESETS["study_long"]
    lengths = _make_users(preset, np.random.default_rng(1)).history_length
    assert np.median(lengths) >= 2000
    assert lengths.max() >= 50_000
