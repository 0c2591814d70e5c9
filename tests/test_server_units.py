"""Coordinator pieces that need no federation: run-config reading, strategy choice, error text."""

import numpy as np
import pytest
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)

from server.runner import config_arg
from server.settings import RunSettings
from server.strategy import build_strategy


def test_run_config_is_read_once_into_typed_fields():
    s = RunSettings.from_run_config({"num-server-rounds": 7, "lr": 1, "strategy": "fedyogi", "unrelated": "x"})
    assert s.num_server_rounds == 7 and s.lr == 1.0 and isinstance(s.lr, float) and s.strategy == "fedyogi"
    assert s.as_params()["num-server-rounds"] == 7


@pytest.mark.parametrize("bad, message", [
    ({"strategy": "fedsgd"}, "strategy='fedsgd'"),
    ({"endpoint": "os"}, "endpoint='os'"),
    ({"model": "resnet"}, "model='resnet'"),
    ({"task": "genomics"}, "task='genomics'"),
    ({"num-server-rounds": 0}, "num-server-rounds"),
    ({"batch-size": 1}, "batch-size"),
])
def test_invalid_run_config_is_refused_with_the_key_named(bad, message):
    with pytest.raises(ValueError, match=message):
        RunSettings.from_run_config(bad)


@pytest.mark.parametrize("name, cls", [
    ("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam), ("fedyogi", FedYogi), ("fedadagrad", FedAdagrad),
    ("fedmedian", FedMedian), ("fedtrimmedavg", FedTrimmedAvg), ("krum", Krum), ("multikrum", MultiKrum),
    ("bulyan", Bulyan)])
def test_strategies_are_flowers_own_and_start_a_round_with_min_train_nodes(name, cls):
    settings = RunSettings(strategy=name, server_lr=0.3, lr=0.02, proximal_mu=0.5, min_train_nodes=3, trim_beta=0.1,
                           num_malicious_nodes=1, num_nodes_to_select=2)
    strategy = build_strategy(settings, num_sites=7)  # Bulyan needs 4 f + 3
    assert type(strategy) is cls
    assert strategy.min_train_nodes == strategy.min_available_nodes == 3  # a vanished node does not stall rounds
    if name == "fedtrimmedavg":
        assert strategy.beta == 0.1
    if name in ("krum", "multikrum", "bulyan"):
        assert strategy.num_malicious_nodes == 1
    if name == "multikrum":
        assert strategy.num_nodes_to_select == 2
    if name == "fedprox":
        assert strategy.proximal_mu == 0.5
    if name in ("fedadam", "fedyogi", "fedadagrad"):
        assert strategy.eta == 0.3 and strategy.eta_l == 0.02


def test_bulyan_with_too_few_sites_is_refused_before_any_round():
    from server.sites import FederationError

    settings = RunSettings(strategy="bulyan", num_malicious_nodes=1)
    with pytest.raises(FederationError, match="bulyan with num-malicious-nodes=1 needs at least 7 sites; 5 take part"):
        build_strategy(settings, num_sites=5)


def test_the_checkpoint_fails_loudly_when_fedopt_keeps_its_moments_elsewhere():
    from flwr.serverapp.strategy import FedAdam, FedAvg

    from server import checkpoint

    adam = FedAdam()
    assert checkpoint.strategy_state(adam) == {}  # before the first aggregation: nothing to keep yet
    adam.m_t, adam.v_t = {"w": np.ones(2)}, {"w": np.zeros(2)}
    assert set(checkpoint.strategy_state(adam)) == {"m_t", "v_t"}
    assert checkpoint.strategy_state(FedAvg()) == {}
    del adam.m_t  # as if a Flower release renamed the attribute
    with pytest.raises(RuntimeError, match=r"FedAdam has no attribute\(s\) \['m_t'\]"):
        checkpoint.strategy_state(adam)
    with pytest.raises(RuntimeError, match="does not keep"):
        checkpoint.restore_strategy(FedAvg(), {"m_t": {"w": np.ones(2)}})


def test_run_config_overrides_are_passed_as_toml_values():
    assert config_arg({"a": 1, "b": 0.5, "c": "it's", "d": True}) == 'a=1 b=0.5 c="it\'s" d=true'


def test_empty_model_lr_and_batch_size_take_the_tasks_defaults():
    onc = RunSettings.from_run_config({"task": "oncology", "model": "", "lr": 0.0, "batch-size": 0})
    rad = RunSettings.from_run_config({"task": "radiology", "model": "", "lr": 0.0, "batch-size": 0})
    assert (onc.model, onc.lr, onc.batch_size) == ("linear", 0.01, 64)
    assert (rad.model, rad.lr, rad.batch_size) == ("small-cnn", 0.001, 16)
    assert RunSettings.from_run_config({"task": "radiology", "lr": 0.1}).lr == 0.1
    with pytest.raises(ValueError, match="model='linear' for radiology"):
        RunSettings.from_run_config({"task": "radiology", "model": "linear"})


def test_a_failed_run_is_recorded_once_with_its_reason_and_raised_again(tmp_path, monkeypatch):
    """A FederationError explains itself; any other error is named by its type too."""
    from models.ledger import read_records
    from server.ledgers import failure_recorded, open_ledger
    from server.sites import FederationError

    monkeypatch.setenv("FEDHOSP_HOME", str(tmp_path))
    ledger = open_ledger(7)
    with pytest.raises(FederationError):
        with failure_recorded(ledger, 7):
            raise FederationError("site check failed:\n  - site A: no cohort.csv")
    with pytest.raises(ZeroDivisionError):
        with failure_recorded(ledger, 7):
            1 / 0
    reasons = [r["data"]["reason"] for r in read_records(ledger.path) if r["event"] == "run-failed"]
    assert reasons == ["site check failed:\n  - site A: no cohort.csv", "ZeroDivisionError: division by zero"]


def test_model_dtypes_keeps_a_0d_buffer_0d_and_integer():
    """FedAvg averages BatchNorm's num_batches_tracked (a 0-d int64) into a float: cast back, it must stay 0-d,
    or every next-round update would differ from the global model in shape and be refused."""
    from flwr.app import Array, ArrayRecord

    from server.strategy import ModelDtypes

    keeper = ModelDtypes(FedAvg())
    keeper.dtypes = {"bn.num_batches_tracked": np.dtype(np.int64), "w": np.dtype(np.float32)}
    out = keeper._cast(ArrayRecord({"bn.num_batches_tracked": Array(np.asarray(25.6)),
                                    "w": Array(np.ones((2, 4))[:, ::2])}))
    counter, weights = out["bn.num_batches_tracked"].numpy(), out["w"].numpy()
    assert counter.shape == () and counter.dtype == np.int64 and int(counter) == 26
    assert weights.shape == (2, 2) and weights.dtype == np.float32 and weights.flags.c_contiguous
