"""The latency benchmark's baselines compute what the networks they stand for compute."""

from __future__ import annotations

import numpy as np
import torch

from model.batch import collate
from model.bench import TwinServingRanker
from model.nets import build_net
from model.nets.twin import TWIN
from tests.factories import random_request, small_spec


def test_twin_serving_ranker_is_the_twin_network() -> None:
    """The serving-time TWIN of the benchmark (chunked over candidates) gives the trained
    network's own probabilities: the speed-up it is compared with is TWIN's real cost."""
    spec = small_spec()
    torch.manual_seed(0)
    net = build_net("twin", spec, top_k=5)
    assert isinstance(net, TWIN)
    net.eval()
    request = random_request(spec, np.random.default_rng(0), 60, 23)
    batch = collate([request], len(spec.event_fields), len(spec.item_fields))
    # Chunks of 3 candidates: the chunk boundary must not change any candidate's top K.
    ranker = TwinServingRanker(net, chunk_bytes=4 * net.config.heads * 60 * 3)
    with torch.inference_mode():
        expected = torch.sigmoid(net(batch))[0]
        served = ranker(
            torch.from_numpy(request.user),
            torch.from_numpy(request.candidates),
            torch.from_numpy(request.events),
        )
    assert served.shape == expected.shape == (23, 4)
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=0)


def test_net_costs_time_each_variant_against_ifa_in_one_run() -> None:
    from model.features import default_spec
    from model.net_costs import net_costs

    report = net_costs(["ifa_channel"], default_spec(n_categories=8), m=4, program_format="eager")
    nets = report["nets"]
    assert list(nets) == ["ifa", "ifa_channel"]
    assert nets["ifa"]["scorer_ratio"] == 1.0
    assert nets["ifa_channel"]["state"]["key_rows"] == 16 + 8
    assert nets["ifa_channel"]["state"]["channel"] == {"fields": ["category"], "slots": [8]}
    for call in ("scorer", "fold"):
        assert nets["ifa_channel"][call]["median_ms"] > 0
        assert nets["ifa_channel"][f"{call}_ratio"] > 0
