"""Learning, balanced vs random (issue 16, item 7), at test size: the concept-balanced selection holds more of the
tail than a uniform random one of the same size, and the tiny model trained on either learns colours through the
image path. Whether balanced data teaches the tail better is measured by bench/learning_balance.py at full size
over 3 seeds (bench/RESULTS.md): at this size the gain is within one run's noise (see below)."""

from __future__ import annotations

import pytest

from bench.learning_balance import bucket_of, experiment

# At this size one training run per arm is too noisy to assert the gain: the tail gain measured at 4,000 URLs, 400
# steps, model seed 0 was +0.284 / +0.328 / +0.229 for web seeds 11 / 12 / 13 in one checkout, +0.184 in another run
# of web seed 11, and +0.05 / +0.01 in two fresh-clone CI runs (the random arm's tail accuracy moved from 0.27 to
# 0.47): the web's URLs hold the port it is served on, uids hash the URL, and both arms draw by uid hash, so every
# run trains on other selections. The gain is measured over seeds at full size: bench/learning_balance.py, 12,000
# URLs, 3 seeds (bench/RESULTS.md "Learning, balanced vs random"). Here: the selection holds the tail, and both
# arms learn through the image path.
CHANCE = 1 / 9  # nine colours


@pytest.fixture(scope="module")
def result(ray_session, tmp_path_factory):
    return experiment(
        tmp_path_factory.mktemp("learning-balance"),
        n_urls=4000,
        held_urls=1500,
        steps=400,
        seeds=(0,),
        web_seed=11,
        arms=("balanced", "random"),
    )


def test_buckets_follow_the_pool_counts():
    """The 7 most frequent compounds of the pool are the head, the rarer half of the 72 the tail (compounds absent
    from the pool rank last)."""
    b = bucket_of({"red circle": 50, "blue star": 40, "pink ring": 1})
    assert b["red circle"] == b["blue star"] == "head" and len(b) == 72
    assert sum(v == "tail" for v in b.values()) == 36 and sum(v == "head" for v in b.values()) == 7
    assert b["pink ring"] != "tail"  # present, so ranked before the 69 absent ones


@pytest.mark.slow
def test_the_balanced_selection_holds_more_tail_and_every_row_is_accounted(result):
    sel = result["selection"]
    assert sel["balanced"]["images"] == sel["random"]["images"] > 300
    assert sel["balanced"]["tail_share"] > 2 * sel["random"]["tail_share"]
    for stage, c in result["counts"].items():
        assert c["in"] == c["out"] + c["rejected"], stage


@pytest.mark.slow
def test_both_arms_learn_colours_through_the_image_path(result):
    m, h = result["mean"], result["held_out"]
    assert h["tail"] >= 60 and h["head"] >= 300  # enough held-out questions in each bucket
    for arm in ("balanced", "random"):
        assert m[arm]["all"] > CHANCE + 0.3 and m[arm]["head"] > CHANCE + 0.3, m  # the image path is used
    assert m["balanced"]["tail"] > CHANCE + 0.2, m  # the tail it was given more of is learnt too
