"""Update validation: each kind of bad update is rejected with its reason; good ones pass."""

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

from server import checkpoint as ckpt
from server.update_checks import ValidationSettings, validate_updates

REFERENCE = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}


def _reply(arrays, n=100):
    meta = Metadata(run_id=1, message_id="", src_node_id=1, dst_node_id=0, reply_to_message_id="", group_id="",
                    created_at=time.time(), ttl=60.0, message_type=MessageType.TRAIN)
    return Message(content=RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "metrics": MetricRecord({"num-examples": n})}),
                   metadata=meta)


def _good(scale=0.1, seed=0):
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, scale, v.shape)).astype(np.float32) for k, v in REFERENCE.items()}


def _run(replies, declared=None, **settings):
    return validate_updates(replies, REFERENCE, declared or {}, ValidationSettings(**settings))


def test_good_updates_pass():
    accepted, rejected, _ = _run([(f"S{i}", _reply(_good(seed=i))) for i in range(4)], {f"S{i}": 100 for i in range(4)})
    assert len(accepted) == 4 and rejected == {}


@pytest.mark.parametrize("make, reason", [
    (lambda: {**_good(), "w": np.full((2, 3), np.nan, dtype=np.float32)}, "tensor 'w' holds NaN or infinite values"),
    (lambda: {**_good(), "w": np.zeros((3, 3), dtype=np.float32)}, "tensor 'w' has shape (3, 3), expected (2, 3)"),
    (lambda: {**_good(), "w": np.zeros((2, 3), dtype=np.float64)}, "tensor 'w' has dtype float64, expected float32"),
    (lambda: {"w": _good()["w"]}, "tensor names differ from the global model (missing ['b'], extra [])"),
])
def test_structurally_bad_updates_are_rejected_with_their_reason(make, reason):
    replies = [("bad", _reply(make()))] + [(f"S{i}", _reply(_good(seed=i))) for i in range(3)]
    accepted, rejected, _ = _run(replies, {"bad": 100, "S0": 100, "S1": 100, "S2": 100})
    assert rejected == {"bad": reason} and len(accepted) == 3


def test_a_scaled_update_is_rejected_by_the_median_ratio_and_by_an_absolute_bound():
    scaled = {k: v * 1000 for k, v in _good(seed=9).items()}
    replies = [("big", _reply(scaled))] + [(f"S{i}", _reply(_good(seed=i))) for i in range(3)]
    _, rejected, distances = _run(replies)
    assert "exceeds 10 x the round's median" in rejected["big"] and distances["big"] > 100 * distances["S0"]
    _, rejected, _ = _run(replies, max_update_ratio=0.0, max_update_norm=5.0)
    assert "exceeds the bound 5" in rejected["big"]


def test_a_step_counter_does_not_count_towards_the_distance():
    """BatchNorm's num_batches_tracked grows with a site's size: a large site is no outlier for it."""
    reference = {**REFERENCE, "bn.num_batches_tracked": np.array(0, dtype=np.int64)}
    replies = [(f"S{i}", _reply({**_good(seed=i), "bn.num_batches_tracked": np.array(steps, dtype=np.int64)}))
               for i, steps in enumerate((13, 13, 13, 1300))]
    accepted, rejected, distances = validate_updates(replies, reference, {}, ValidationSettings())
    assert rejected == {} and len(accepted) == 4 and max(distances.values()) < 1


def test_num_examples_must_be_a_positive_integer_within_what_the_site_declared():
    replies = [("inflated", _reply(_good(), n=10_000_000)), ("zero", _reply(_good(), n=0)),
               ("frac", _reply(_good(), n=2.5)), ("ok", _reply(_good(), n=90))]
    _, rejected, _ = _run(replies, {"inflated": 120, "zero": 100, "frac": 100, "ok": 100})
    assert rejected["inflated"] == "num-examples 10000000 exceeds the declared training cohort of 120"
    assert "is not a positive integer" in rejected["zero"] and "is not a positive integer" in rejected["frac"]
    assert "ok" not in rejected
    _, rejected, _ = _run([("ok", _reply(_good(), n=90))], {"ok": 100}, max_examples=50)
    assert rejected == {"ok": "num-examples 90 exceeds the cap of 50"}


def test_checkpoints_round_trip_and_replace_atomically(tmp_path):
    path = tmp_path / "run.npz"
    first = ckpt.Checkpoint(2, {"w": np.ones(3)}, {"m_t": {"w": np.full(3, 0.5)}}, {"seed": 7}, "abc", "/l", 11)
    ckpt.save(path, first)
    loaded = ckpt.load(path)
    assert loaded.server_round == 2 and loaded.run_config == {"seed": 7} and loaded.flwr_run_id == 11
    np.testing.assert_array_equal(loaded.strategy_state["m_t"]["w"], np.full(3, 0.5))
    ckpt.save(path, ckpt.Checkpoint(3, {"w": np.zeros(3)}))
    assert ckpt.load(path).server_round == 3 and not list(tmp_path.glob("*.tmp"))
