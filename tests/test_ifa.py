"""The IFA network: padding invariance, permutation equivariance, serving split, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.batch import Request, collate
from model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from model.loss import esmm_loss, joint_probabilities
from model.nets import build_net
from model.nets.ifa import IFA
from model.serving import serving_programs
from tests.factories import live_channel, random_request, small_spec


@pytest.fixture(
    params=[("ifa", False), ("ifa", True), ("ifa_channel", False), ("ifa_channel", True)],
    ids=["no-decay", "decay", "channel", "channel-decay"],
)
def net(request):
    name, time_decay = request.param
    torch.manual_seed(0)
    net = build_net(name, small_spec(), time_decay=time_decay)
    if name == "ifa_channel":
        assert isinstance(net, IFA)
        live_channel(net)  # γ > 0, so the channel's terms are exercised
    return net.eval()


def make_batch(spec, shapes, seed=0):
    rng = np.random.default_rng(seed)
    requests = [random_request(spec, rng, n, m) for n, m in shapes]
    return requests, collate(requests, len(spec.event_fields), len(spec.item_fields))


def test_padded_events_and_candidates_change_nothing_for_real_ones(net):
    spec = small_spec()
    _, alone = make_batch(spec, [(30, 6)])
    _, padded = make_batch(spec, [(30, 6), (200, 40)])  # first request padded to N=200, M=40
    with torch.no_grad():
        expected = net(alone)[0]
        got = net(padded)[0, :6]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_permuting_candidates_permutes_scores(net):
    spec = small_spec()
    requests, batch = make_batch(spec, [(50, 12)])
    perm = torch.randperm(12)
    permuted = collate(
        [
            type(requests[0])(
                requests[0].user,
                requests[0].candidates[perm.numpy()],
                requests[0].events,
                requests[0].event_times,
                requests[0].request_time,
            )
        ],
        len(spec.event_fields),
        len(spec.item_fields),
    )
    with torch.no_grad():
        torch.testing.assert_close(net(permuted)[0], net(batch)[0][perm], atol=1e-5, rtol=1e-5)


def test_serving_programs_equal_the_training_forward(net):
    spec = small_spec()
    requests, batch = make_batch(spec, [(40, 9), (0, 5)])
    encoder, scorer = serving_programs(net)
    with torch.no_grad():
        logits = net(batch)
        for i, r in enumerate(requests):
            s, z = encoder(
                torch.from_numpy(r.events),
                torch.from_numpy(r.event_times),
                torch.tensor(r.request_time, dtype=torch.float64),
            )
            probabilities, score = scorer(
                torch.from_numpy(r.user), torch.from_numpy(r.candidates), s, z
            )
            m = len(r.candidates)
            torch.testing.assert_close(
                probabilities, torch.sigmoid(logits[i, :m]), atol=1e-6, rtol=1e-5
            )
            torch.testing.assert_close(
                score, joint_probabilities(logits[i, :m])[:, 1], atol=1e-6, rtol=1e-5
            )
            assert torch.isfinite(probabilities).all()


def test_a_few_optimiser_steps_reduce_the_loss():
    spec = small_spec()
    torch.manual_seed(0)
    net = build_net("ifa", spec)
    _, batch = make_batch(spec, [(30, 10), (80, 20), (5, 7), (0, 3)])
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = esmm_loss(net(batch), batch.labels, batch.candidate_mask)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0]


def test_padded_candidates_do_not_touch_the_loss():
    spec = small_spec()
    torch.manual_seed(0)
    net = build_net("ifa", spec)
    _, alone = make_batch(spec, [(30, 6)])
    _, padded = make_batch(spec, [(30, 6), (10, 25)])
    first_only = torch.zeros_like(padded.candidate_mask)
    first_only[0, :6] = True
    loss_alone = esmm_loss(net(alone), alone.labels, alone.candidate_mask)
    loss_padded = esmm_loss(net(padded), padded.labels, first_only)
    torch.testing.assert_close(loss_alone, loss_padded, atol=1e-5, rtol=1e-5)


def test_checkpoint_round_trip_rebuilds_the_same_network(tmp_path, net):
    spec = small_spec()
    _, batch = make_batch(spec, [(20, 4)])
    metadata = {"seed": 0, "auc": np.float32(0.75), "sizes": np.arange(2)}
    save_checkpoint(Checkpoint("ifa", spec, net, metadata), tmp_path / "ifa.pt")
    loaded = load_checkpoint(tmp_path / "ifa.pt")
    assert loaded.metadata == {"seed": 0, "auc": 0.75, "sizes": [0, 1]}
    with torch.no_grad():
        torch.testing.assert_close(loaded.net(batch), net(batch))


def test_unknown_network_and_config_fields_are_rejected():
    with pytest.raises(KeyError, match="unknown network"):
        build_net("nope", small_spec())
    with pytest.raises(TypeError, match="no fields"):
        build_net("ifa", small_spec(), heads_count=3)


def _with_history_twice(request: Request) -> Request:
    """The same request with every history event present twice (same times, same order)."""
    order = np.argsort(np.concatenate([request.event_times, request.event_times]), kind="stable")
    events = np.concatenate([request.events, request.events])[order]
    times = np.concatenate([request.event_times, request.event_times])[order]
    return Request(request.user, request.candidates, events, times, request.request_time)


@pytest.mark.parametrize("degree_feature", [False, True], ids=["normalised-read", "degree"])
def test_only_the_degree_feature_sees_how_much_history_is_related(degree_feature):
    """The normalised read is a weighted mean: a history with every event twice reads the same.
    The degree φ(q)ᵀz doubles, so with the feature on the scores must move."""
    spec = small_spec()
    torch.manual_seed(0)
    net = build_net("ifa", spec, degree_feature=degree_feature).eval()
    (request,), _ = make_batch(spec, [(40, 8)])
    once = collate([request], len(spec.event_fields), len(spec.item_fields))
    twice = collate([_with_history_twice(request)], len(spec.event_fields), len(spec.item_fields))
    with torch.no_grad():
        a, b = net(once), net(twice)
    if degree_feature:
        assert (a - b).abs().max() > 1e-4
    else:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
