"""The hospital node's ClientApp: describe the site, train locally, evaluate, validate, analyse.

Replies carry only ``"arrays"`` (weights) and ``"metrics"`` (numbers); the
``query`` reply adds the site's name and feature names so that the coordinator
can build the model and label per-site metrics. Every message passes the mods
of client/mods.py first (error boundary, site ledger, policy), which resolve the
message's task and site once (:func:`client.mods.visit`) and turn any exception
into text that names the site and the problem only.
"""

from __future__ import annotations

import dataclasses
import time

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import secure_update
from client import validation as site_validation
from client.data.tabular import cohort_fingerprint
from client.mods import FINGERPRINT, MODS, Visit, visit
from models import wire

ANALYSIS_STATE = "fedhosp.analysis"

app = ClientApp(mods=MODS)


def _open(current: Visit):
    """This message's data (read through the task's reader and cache); its fingerprint is left in
    ``context.state`` for the site ledger."""
    task, site = current.task, current.site
    data = task.load(site, validation=current.validating)
    current.context.state[FINGERPRINT] = ConfigRecord({"data-fingerprint": task.fingerprint(site, data)})
    if not current.validating:  # a validation checks the test split's size instead
        current.policy.check_examples(site.name, len(data.train), task.unit)
    return data


def _budget(current: Visit, data, cfg, server_round: int | None):
    """The round's privacy budget (client/privacy.py), or ``None`` without dp."""
    from client import privacy

    task = current.task
    return privacy.round_budget(current.policy, current.site.name, cfg, current.ledger_folder,
                                task.fingerprint(current.site, data), task.privacy_units(data),
                                getattr(task, "endpoint", None) == "survival", server_round)


@app.query()
def describe(msg: Message, context: Context) -> Message:
    current = visit()
    data = _open(current)
    features, counts = current.task.describe(data)
    info = ConfigRecord({"site-name": current.site.name, "features": features})
    if current.config.get("mode") == "train":  # a training run's site check: can this site's budget carry it?
        from client.privacy import privacy_plan

        budget = _budget(current, data, current.config, None)
        counts.update(privacy_plan(budget, current.site.name, int(current.config["num-server-rounds"])))
    metrics = MetricRecord({"num-train": len(data.train), "num-test": len(data.test), **counts})
    return Message(RecordDict({"site": info, "metrics": metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on this site's data from the global model; reply with the weights, or, in a secure round's
    masked-vector stage, with the bounded update that Flower's SecAgg+ mod masks (client/secure_update.py)."""
    import torch

    from client.train import TrainSettings  # torch: imported by the messages that compute only

    current = visit()
    task, site = current.task, current.site
    data = _open(current)
    secure, model = None, None
    if secure_update.FITINS_ARRAYS in msg.content.array_records:
        context.state.config_records.pop(secure_update.SENT, None)
        model = task.build(data)  # its names order the arrays the legacy FitIns carries
        secure = secure_update.instruction(msg, list(model.state_dict()))
        cfg = secure.config
        global_state = {k: torch.from_numpy(v.copy()) for k, v in secure.arrays.items()}
    else:
        cfg = msg.content["config"]
        global_state = None
    server_round = int(cfg["server-round"])
    budget = _budget(current, data, cfg, server_round)  # a site with a budget trains only with dp
    if cfg.get("objective") == "newton-cox":
        return _newton_step(msg, data)
    if budget is not None:  # refuse a round the budget cannot carry, before any training
        budget.policy.check_privacy(site.name, True, server_round, budget.after(0), budget.after(1))
    if model is None:
        model = task.build(data)
    model.load_state_dict(global_state if secure is not None else msg.content["arrays"].to_torch_state_dict())
    settings = TrainSettings(
        local_epochs=int(cfg["local-epochs"]),
        local_steps=int(cfg["local-steps"]),
        batch_size=int(cfg["batch-size"]),
        lr=float(cfg["lr"]),
        proximal_mu=float(cfg.get("proximal-mu", 0.0)),
        seed=int(cfg["seed"]),
        dp=budget.dp if budget is not None else None,
    )
    started = time.perf_counter()
    metrics = task.train(model, data, settings, server_round, site.name)
    metrics["train_seconds"] = time.perf_counter() - started
    if budget is not None:  # spent once the weights exist: recorded before they can leave
        run = str(cfg.get("run-key") or context.run_id)
        budget.store.record(run, server_round, metrics["noise_multiplier"], metrics["sample_rate"],
                            int(metrics["dp_steps"]), delta=budget.delta,
                            check=lambda spent, total: budget.policy.check_privacy(site.name, True, server_round,
                                                                                   spent, total))
        # the same keys at every site (Flower aggregates only uniform records): max_epsilon 0 = no budget set
        metrics.update({"epsilon": budget.store.spent(budget.delta, run),
                        "epsilon_spent": budget.store.spent(budget.delta), "delta": budget.delta,
                        "max_epsilon": budget.policy.max_epsilon})
    if secure is not None:
        trained = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        update, record = secure_update.bounded_update(site.name, trained, secure)
        secure_update.remember(context, secure, update, record)
        return secure_update.reply(msg, update, len(data.train), metrics)
    metrics["num-examples"] = len(data.train)
    reply = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)})
    return Message(reply, reply_to=msg)


def _newton_step(msg: Message, data) -> Message:
    """``strategy = "newton"``: this stratum's Cox sums at the received linear weights, which go back unchanged
    (no local training; server/newton.py:NewtonCox)."""
    from client.stats import newton_sums

    (_, weights), = msg.content["arrays"].items()
    sums = newton_sums(data, weights.numpy())
    metrics = MetricRecord({"train_loss": -float(sums["loglik"][0]) / max(int(data.train.event.sum()), 1),
                            "num-examples": len(data.train)})
    newton = ArrayRecord({k: Array(v) for k, v in sums.items()})
    return Message(RecordDict({"arrays": msg.content["arrays"], "newton": newton, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    current = visit()
    data = _open(current)
    model = current.task.build(data)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    started = time.perf_counter()
    metrics = current.task.evaluate(model, data)
    metrics["eval_seconds"] = time.perf_counter() - started
    metrics["num-examples"] = len(data.test)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate("validate")
def validate(msg: Message, context: Context) -> Message:
    """Test one model (``"arrays"``) or several (``"model/<label>"``, cross-site) on this site's test split.

    Figures for each model are prefixed ``<label>::``; subgroups are computed for
    the model under validation only (the sites' own models appear in the matrix).
    """
    current = visit()
    task, site = current.task, current.site
    data = _open(current)
    cfg = msg.content["config"]
    current.policy.check_examples(site.name, len(data.test), task.unit, "validate on")
    settings = site_validation.QCSettings(bootstrap=int(cfg["bootstrap-samples"]), min_cell=int(cfg["min-cell"]),
                                          threshold=float(cfg["threshold"]), seed=int(cfg["seed"]))
    records = dict(msg.content.array_records)
    started = time.perf_counter()
    metrics: dict = {}
    for name, record in sorted(records.items()):
        model = task.build(data)
        model.load_state_dict(record.to_torch_state_dict())
        subgroups = name in ("arrays", "model/global")  # the model under validation, not the sites' own
        result = site_validation.validate(task.predictions(model, data),
                                          settings if subgroups else dataclasses.replace(settings, subgroups=False))
        metrics.update(wire.flatten(result, "" if name == "arrays" else name.removeprefix("model/") + "::"))
    metrics["validate_seconds"] = time.perf_counter() - started
    metrics["num-examples"] = len(data.test)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query("analyse")
def analyse(msg: Message, context: Context) -> Message:
    """Treatment-effect analysis (client/stats.py): counts per arm and bin, or Cox sums per model; never a row."""
    import json

    from client import stats

    started = time.perf_counter()
    current = visit()
    site, cfg = current.site, msg.content["config"]
    split = lambda text: [c for c in str(text).split(",") if c]  # noqa: E731
    treatment, subgroups = str(cfg["treatment"]), split(cfg["subgroups"])
    data = stats.load_analysis_data(site.folder, site.name, treatment, split(cfg["covariates"]), subgroups)
    current.policy.check_examples(site.name, len(data), "patients", "analyse")
    context.state[FINGERPRINT] = ConfigRecord({"data-fingerprint": cohort_fingerprint(site.folder)})
    min_cell = int(cfg["min-cell"])
    if cfg["step"] == "describe":
        metrics = stats.describe(data, subgroups, float(cfg["km-bin"]), min_cell)
    else:
        # the iterations this node answered in this run, kept in its own memory (not the coordinator's word)
        answered = int(context.state[ANALYSIS_STATE]["iterations"]) if ANALYSIS_STATE in context.state else 0
        current.policy.check_analysis_iteration(site.name, answered + 1)
        context.state[ANALYSIS_STATE] = ConfigRecord({"iterations": answered + 1})
        metrics = stats.cox_sums(data, json.loads(str(cfg["fits"])), min_cell)
    metrics["compute-seconds"] = time.perf_counter() - started
    reply = RecordDict({"site": ConfigRecord({"site-name": site.name}), "metrics": MetricRecord(metrics)})
    return Message(reply, reply_to=msg)
