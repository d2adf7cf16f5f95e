"""The pretraining bench's step window: both sides' readings give the same steps and times."""
from argparse import Namespace

import pytest

from bench.bench_pretrain import PEERS, SIDES, timing


def test_timing_counts_the_steps_after_warmup_and_the_time_from_the_start():
    marks = [10.0, 11.0, 13.0, 14.0, 16.0, 19.0]  # a reading as each of 6 steps starts
    t = timing(Namespace(warmup=2), marks, start=4.0)
    assert t == {"elapsed": 19.0 - 13.0, "steps": 3, "to_last_step": 15.0}


def test_timing_refuses_a_window_without_steps():
    with pytest.raises(RuntimeError, match="--steps must exceed --warmup"):
        timing(Namespace(warmup=3), [1.0, 2.0, 3.0, 4.0], start=0.0)


def test_every_side_but_the_trainer_has_a_peer_and_compiled_prefers_compiled():
    assert set(PEERS) | {"hf", "hf_compiled"} == set(SIDES)
    assert PEERS["ours_compiled"][0] == "hf_compiled"
