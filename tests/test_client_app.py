"""The ClientApp called directly, as a SuperNode would call it: what leaves the node."""

import time

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from client.app import app
from client.data import demo
from models.builders import build_model, model_hash
from tests.node_replies import error_text

RUN_CONFIG = {"task": "oncology", "endpoint": "survival", "model": "linear", "seed": 42, "data-root": ""}


def _message(kind: str, content: RecordDict) -> Message:
    meta = Metadata(run_id=1, message_id="", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=600.0, message_type=kind)
    return Message(content=content, metadata=meta)


def _context(folder, site="Sjælland", **run_config) -> Context:
    return Context(run_id=1, node_id=7, node_config={"site-name": site, "data-dir": str(folder)},
                   state=RecordDict(), run_config={**RUN_CONFIG, **run_config})


def _train_content(endpoint="survival", model="linear", **config) -> RecordDict:
    net = build_model("oncology", model, endpoint=endpoint, num_features=len(demo.FEATURES))
    cfg = {"lr": 0.01, "local-epochs": 1, "local-steps": 0, "batch-size": 32, "seed": 42, "server-round": 1}
    cfg.update(config)
    return RecordDict({"arrays": ArrayRecord(net.state_dict()), "config": ConfigRecord(cfg)})


@pytest.fixture
def site_dir(tmp_path):
    folder = tmp_path / "site"
    demo.write_site(folder, demo.REGIONS[3])
    return folder


def _assert_only_weights_and_numbers(reply: Message, with_arrays: bool):
    content = reply.content
    assert set(content.keys()) == ({"arrays", "metrics"} if with_arrays else {"metrics"})
    assert not content.config_records
    for value in content["metrics"].values():
        assert isinstance(value, (int, float)) and not isinstance(value, bool)


def test_train_reply_carries_only_weights_and_numeric_metrics(site_dir):
    context = _context(site_dir)
    sent = _train_content()
    reply = app(_message(MessageType.TRAIN, sent), context)
    assert not reply.has_error(), reply.error
    _assert_only_weights_and_numbers(reply, with_arrays=True)
    arrays = reply.content["arrays"]
    assert list(arrays.keys()) == list(sent["arrays"].keys())
    assert model_hash({k: a.numpy() for k, a in arrays.items()}) != model_hash(
        {k: a.numpy() for k, a in sent["arrays"].items()})  # it trained
    # num-examples counts patients of the training split, not batches
    frame = demo.cohort(demo.REGIONS[3])
    assert reply.content["metrics"]["num-examples"] == pytest.approx(round(len(frame) * 0.75), abs=1)
    # no standardisation statistic, identifier or file name travels
    blob = repr(reply.content).lower()
    assert "patient" not in blob and "sjæ" not in blob and str(site_dir).lower() not in blob


def test_evaluate_reply_has_c_index_and_num_test_patients(site_dir):
    reply = app(_message(MessageType.EVALUATE, _train_content()), _context(site_dir))
    _assert_only_weights_and_numbers(reply, with_arrays=False)
    metrics = reply.content["metrics"]
    assert 0.0 <= metrics["c_index"] <= 1.0
    assert metrics["num-examples"] == pytest.approx(round(len(demo.cohort(demo.REGIONS[3])) * 0.25), abs=1)


def test_local_steps_runs_exactly_that_many_minibatch_steps(site_dir):
    reply = app(_message(MessageType.TRAIN, _train_content(**{"local-steps": 3})), _context(site_dir))
    assert reply.content["metrics"]["local_steps"] == 3


def test_training_is_reproducible_for_the_same_seed_round_and_site(site_dir):
    replies = [app(_message(MessageType.TRAIN, _train_content(model="mlp")), _context(site_dir, model="mlp"))
               for _ in range(2)]
    hashes = {model_hash({k: a.numpy() for k, a in r.content["arrays"].items()}) for r in replies}
    assert len(hashes) == 1


def test_response_endpoint_reports_auc_and_accuracy(site_dir):
    content = _train_content(endpoint="response")
    ctx = _context(site_dir, endpoint="response")
    trained = app(_message(MessageType.TRAIN, content), ctx)
    reply = app(_message(MessageType.EVALUATE, RecordDict({"arrays": trained.content["arrays"],
                                                           "config": ConfigRecord({})})), ctx)
    assert {"auc", "accuracy", "loss", "num-examples"} <= set(reply.content["metrics"].keys())


def test_query_describes_site_schema_and_counts_without_rows(site_dir):
    reply = app(_message(MessageType.QUERY, RecordDict({"config": ConfigRecord({})})), _context(site_dir))
    assert reply.content["site"]["site-name"] == "Sjælland"
    assert list(reply.content["site"]["features"]) == sorted(demo.FEATURES)
    assert reply.content["metrics"]["num-train"] + reply.content["metrics"]["num-test"] == demo.REGIONS[3].size


def test_an_unexpected_error_leaves_the_node_without_its_details(site_dir):
    # a state dict for a different model: torch's error would quote tensor shapes and names
    wrong = build_model("oncology", "mlp", num_features=len(demo.FEATURES))
    content = RecordDict({"arrays": ArrayRecord(wrong.state_dict()), "config": _train_content()["config"]})
    reply = app(_message(MessageType.TRAIN, content), _context(site_dir))
    assert reply.error.reason == "site Sjælland: train failed (RuntimeError); details are in the node's log"


@pytest.fixture(scope="module")
def knee_dir(tmp_path_factory):
    from client.data.radiology_demo import radiology_regions, write_radiology_site

    folder = tmp_path_factory.mktemp("knee") / "Syddanmark"
    write_radiology_site(folder, radiology_regions(3)[2], n_images=40)  # the region with broken files
    return folder


def _radiology(knee_dir, model="small-cnn", **config):
    ctx = Context(run_id=1, node_id=7, node_config={"site-name": "Syddanmark", "data-dir": str(knee_dir),
                                                    "cache-dir": str(knee_dir.parent / "cache")},
                  state=RecordDict(), run_config={"task": "radiology", "target": "kl-grade", "model": model,
                                                  "image-size": 64, "seed": 42, "data-root": ""})
    net = build_model("radiology", model, target="kl-grade", image_size=64)
    cfg = {"lr": 0.003, "local-epochs": 1, "local-steps": 0, "batch-size": 16, "seed": 42, "server-round": 1}
    cfg.update(config)
    return ctx, RecordDict({"arrays": ArrayRecord(net.state_dict()), "config": ConfigRecord(cfg)})


def test_radiology_replies_carry_no_dicom_attribute_uid_patient_or_path(knee_dir):
    import pandas as pd

    ctx, content = _radiology(knee_dir)
    replies = [app(_message(kind, content), ctx) for kind in (MessageType.QUERY, MessageType.TRAIN, MessageType.EVALUATE)]
    assert all(not r.has_error() for r in replies)
    _assert_only_weights_and_numbers(replies[1], with_arrays=True)
    _assert_only_weights_and_numbers(replies[2], with_arrays=False)
    assert {"auc", "kappa", "accuracy"} <= set(replies[2].content["metrics"].keys())
    labels = pd.read_csv(knee_dir / "labels.csv")
    text = " ".join(repr(r.content) for r in replies)
    for value in list(labels["SOPInstanceUID"]) + list(labels["PatientID"]) + [str(knee_dir), "Carestream"]:
        assert str(value) not in text
    assert replies[0].content["metrics"]["skipped-rows"] == 4  # truncated, SR, Thumbs.db, unlabelled


def test_densenet121_trains_a_step_and_returns_every_tensor_it_received(knee_dir):
    ctx, content = _radiology(knee_dir, model="densenet121", **{"local-steps": 1})
    reply = app(_message(MessageType.TRAIN, content), ctx)
    assert not reply.has_error()
    assert list(reply.content["arrays"].keys()) == list(content["arrays"].keys())
    assert reply.content["metrics"]["local_steps"] == 1


def test_the_node_config_chooses_device_and_threads_and_a_missing_gpu_is_named(knee_dir):
    import torch


    threads = torch.get_num_threads()
    ctx, content = _radiology(knee_dir, **{"local-steps": 1})
    try:
        ctx.node_config.update({"device": "cpu", "threads": 1})
        reply = app(_message(MessageType.TRAIN, content), ctx)
        assert not reply.has_error() and torch.get_num_threads() == 1
        if not torch.cuda.is_available():
            ctx.node_config["device"] = "cuda"
            error_text(app(_message(MessageType.TRAIN, content), ctx),
                       "^site Syddanmark: node config device='cuda', but torch sees no")
    finally:
        torch.set_num_threads(threads)


def _validate_content(endpoint="response", **config) -> RecordDict:
    net = build_model("oncology", "linear", endpoint=endpoint, num_features=len(demo.FEATURES))
    cfg = {"task": "oncology", "endpoint": endpoint, "model": "linear", "bootstrap-samples": 50, "min-cell": 10,
           "threshold": 0.5, "seed": 42, **config}
    return RecordDict({"arrays": ArrayRecord(net.state_dict()), "config": ConfigRecord(cfg)})


def test_a_validation_only_cohort_is_tested_and_only_aggregates_leave(tmp_path):
    """A hospital may hold a cohort kept only for testing models (every row split=test); identifiers stay."""
    frame = demo.cohort(demo.REGIONS[3])
    frame["split"] = "test"
    folder = tmp_path / "held-out"
    folder.mkdir()
    frame.to_csv(folder / "cohort.csv", index=False)
    context = _context(folder, endpoint="response")  # the run config says survival nowhere: the model's spec wins
    reply = app(_message("evaluate.validate", _validate_content()), context)
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == len(frame) and metrics["n"] == len(frame)
    assert {"m/auc/value", "m/auc/low", "m/auc/high", "m/sensitivity/value", "m/ece/value", "rel/count"} <= set(metrics)
    assert any(k.startswith("g/sex/") for k in metrics) and any(k.startswith("g/age/") for k in metrics)
    text = repr(dict(metrics))
    assert not any(pid in text for pid in frame["patient_id"])
    # training on the same folder is refused: it has no training split
    error_text(app(_message(MessageType.TRAIN, _train_content()), _context(folder)),
               r"^site Sjælland: too few usable patients \(0 train, 400 test\)")


def test_a_data_root_that_does_not_match_the_federation_is_named_with_the_fix(tmp_path):
    """A simulation node maps its partition to a folder of data-root; a count mismatch must not pick wrong sites."""
    demo.write_demo(tmp_path / "sites", 3)
    (tmp_path / "sites" / "Zealand-copy").mkdir()
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                      run_config={**RUN_CONFIG, "data-root": str(tmp_path / "sites")})
    query = _message(MessageType.QUERY, RecordDict({"config": ConfigRecord({"request": "describe"})}))
    error_text(app(query, context), "^data-root holds 4 site folders but the federation has 3 nodes; "
                                    'run with --federation-config "num-supernodes=4"')


def test_an_error_in_a_mod_leaves_the_node_as_generic_text_without_its_path(site_dir, tmp_path):
    """The error boundary is the outermost mod: a ledger key that cannot be written (an OSError quoting its path)
    reaches the coordinator as the site, the handler and the error's type only."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    context = _context(site_dir)
    context.node_config["ledger-dir"] = str(blocker / "ledger")
    reply = app(_message(MessageType.TRAIN, _train_content()), context)
    text = error_text(reply, r"^site Sjælland: train failed \((FileExists|NotADirectory)Error\); "
                             r"details are in the node's log$")
    assert str(tmp_path) not in text
