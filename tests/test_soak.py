"""The soak at test size (bench/soak.py has the full one): transient faults at the web and the LLM, reruns with
--retry-failed until stable, and nothing lost, nothing twice, the driver's memory flat."""

from __future__ import annotations

import pytest

from bench.soak import soak


@pytest.mark.slow
def test_soak_with_transient_faults_loses_nothing_and_asks_nothing_twice(ray_session, tmp_path):
    res = soak(n=150, web_faults=0.1, llm_faults=0.1, rounds=5, workdir=tmp_path, shard_size=50)
    assert res["balanced"], res["rounds"]  # in = out + rejected at every stage of every round
    assert res["same_as_reference"]  # the rows and rejects of the run on servers without faults
    assert res["transient_left"] == res["reference_transient_left"]  # only the web's own broken items
    assert len(res["rounds"]) >= 2 and res["faulted_images"] >= 5 and len(res["faulted_by_kind"]) >= 2
    assert sum(v for k, v in res["llm_served"].items() if k != "ok") > 0  # the LLM did fail some requests
    assert res["images_answered_twice"] == 0 and res["llm_requests_answered_twice"] == 0
    assert res["reference_llm_requests_answered_twice"] == 0
    first, *later = res["driver_peak_rss_mib"]
    assert max(later) <= 1.2 * first, res["driver_peak_rss_mib"]  # flat across the rounds
