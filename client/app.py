"""The hospital node's ClientApp: describe the site, train locally, evaluate locally.

Replies carry only ``"arrays"`` (weights) and ``"metrics"`` (numbers); the
``query`` reply adds the site's name and feature names so that the coordinator
can build the model and label per-site metrics. Exceptions are re-raised with
text that names the site and the problem only, since Flower sends that text to
the coordinator.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import validation as site_validation
from models import wire
from client.data.tabular import cohort_fingerprint
from models.errors import COX_REFUSAL, SiteDataError
from models.ledger import Ledger, load_or_create_key
from client.policy import SitePolicy, installed_app_hash
from client.site import Site, resolve_site
from models.home import fedhosp_home
from client.tasks import task_for
from models.builders import model_hash

log = logging.getLogger(__name__)
FINGERPRINT = "fedhosp.data"
MODEL_SPEC_KEYS = ("task", "endpoint", "target", "model", "image-size", "dp")
ANALYSE = "query.analyse"
ANALYSIS_STATE = "fedhosp.analysis"


def site_ledger_mod(msg: Message, context: Context, call_next) -> Message:
    """Record in the site's own signed ledger what this node received, sent or refused."""
    try:
        site = _site(context, run_config=effective_run_config(msg, context))
    except Exception:
        site = None
    ledger = site_ledger(context, site)
    kind = msg.metadata.message_type.replace(".", "-")  # "evaluate-validate" for a validation
    config = dict(msg.content["config"]) if "config" in msg.content.config_records else {}
    entry = {"run_id": context.run_id, "site": site.name if site else None, "round": config.get("server-round"),
             "received": {"config": config}}
    if "iteration" in config:
        entry["iteration"] = config["iteration"]
    if "arrays" in msg.content.array_records:
        entry["received"]["model_hash"] = model_hash({k: a.numpy() for k, a in msg.content["arrays"].items()})
    others = {name: record for name, record in msg.content.array_records.items() if name != "arrays"}
    if others:  # a cross-site evaluation sends several models
        entry["received"]["model_hashes"] = {name: model_hash({k: a.numpy() for k, a in record.items()})
                                             for name, record in others.items()}
    try:
        reply = call_next(msg, context)
    except Exception as exc:  # the text is what leaves the node (already free of identifiers)
        ledger.append(f"{kind}-failed", {**entry, "reason": str(exc)})
        raise
    sent: dict = {}
    if msg.metadata.message_type == ANALYSE:  # per-bin counts can be under min-cell: their digest, and the sums
        from client.stats import ledger_view

        sent = ledger_view(dict(reply.content["metrics"]))
    elif "metrics" in reply.content.metric_records:
        metrics = dict(reply.content["metrics"])
        sent["num_examples"] = metrics.pop("num-examples", None)
        sent["metrics"] = metrics
    if "arrays" in reply.content.array_records:
        sent["update_hash"] = model_hash({k: a.numpy() for k, a in reply.content["arrays"].items()})
    fingerprint = context.state.config_records.get(FINGERPRINT)
    ledger.append(kind, {**entry, "sent": sent,
                         "data_fingerprint": fingerprint["data-fingerprint"] if fingerprint else None})
    return reply


def site_policy_mod(msg: Message, context: Context, call_next) -> Message:
    """Enforce the hospital's policy (node config ``policy``) before any data is read."""
    run_config = effective_run_config(msg, context)
    site = _site(context, run_config=run_config)
    policy = SitePolicy.load(context.node_config.get("policy"), site.name)
    config = msg.content["config"] if "config" in msg.content.config_records else {}
    mode = str(run_config.get("mode", "train"))
    rounds = 0 if mode == "analyse" else int(context.run_config.get("num-server-rounds", 0))  # analyses iterate
    policy.check_run(site.name, str(run_config.get("task", "oncology")), rounds, config.get("server-round"),
                     installed_app_hash(__file__), mode)
    return call_next(msg, context)


def effective_run_config(msg: Message, context: Context) -> dict:
    """The run config, with the model's own task keys when the coordinator sends a model to validate.

    A validation run names only ``model-uri``; the coordinator reads the model's
    task, outcome and architecture from its spec and sends them in the message
    config (data only: names and numbers).
    """
    run_config = dict(context.run_config)
    if "config" in msg.content.config_records:
        config = msg.content["config"]
        run_config.update({key: config[key] for key in MODEL_SPEC_KEYS if key in config})
    return run_config


def ledger_folder(context: Context, site: Site | None) -> Path:
    """Node config ``ledger-dir``; the default is ``$FEDHOSP_HOME/site-ledgers/<site>``. The privacy budget lives
    there too (``privacy/``)."""
    folder = context.node_config.get("ledger-dir")
    return Path(str(folder)) if folder else fedhosp_home() / "site-ledgers" / (site.name if site else "unknown")


def site_ledger(context: Context, site: Site | None) -> Ledger:
    """``<ledger-dir>/run-<id>.jsonl``, signed with ``<ledger-dir>/site_ed25519.pem`` (0600)."""
    folder = ledger_folder(context, site)
    key = load_or_create_key(folder / "site_ed25519.pem")
    return Ledger(folder / f"run-{context.run_id}.jsonl", key,
                  {"role": "site", "site": site.name if site else None, "run_id": context.run_id})


# The ledger is the outer mod, so that what the policy refuses is recorded too.
app = ClientApp(mods=[site_ledger_mod, site_policy_mod])


def _open(context: Context, msg: Message):
    """The task, this node's site and its data (read through the task's reader and cache).

    The data's fingerprint is left in ``context.state`` for the site ledger.
    """
    run_config = effective_run_config(msg, context)
    task = task_for(run_config, dict(context.node_config))
    site = _site(context, task)
    validation = _validating(msg)
    data = task.load(site, validation=validation)
    context.state[FINGERPRINT] = ConfigRecord({"data-fingerprint": task.fingerprint(site, data)})
    if not validation:  # a validation checks the test split's size instead
        SitePolicy.load(context.node_config.get("policy"), site.name).check_examples(site.name, len(data.train),
                                                                                     task.unit)
    return task, site, data


def _validating(msg: Message) -> bool:
    """The coordinator is only testing a model here (a validation, or a cross-site run's describe/evaluate)."""
    if msg.metadata.message_type.endswith(".validate"):
        return True
    config = msg.content["config"] if "config" in msg.content.config_records else {}
    return msg.metadata.message_type == "query" and config.get("mode") == "validate"


def _site(context: Context, task=None, run_config: dict | None = None) -> Site:
    task = task or task_for(run_config or dict(context.run_config), dict(context.node_config))
    return resolve_site(dict(context.node_config), str(context.run_config.get("data-root", "")), task.demo_site)


def _safe(handler):
    """Let only contract errors' text leave the node; anything else becomes a generic error."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except SiteDataError:
            raise
        except Exception as exc:
            log.exception("fedhosp %s failed on this node", handler.__name__)
            try:
                name = _site(context, run_config=effective_run_config(msg, context)).name
            except Exception:
                name = "unknown"
            raise RuntimeError(
                f"site {name}: {handler.__name__} failed ({type(exc).__name__}); details are in the node's log"
            ) from None

    return wrapper


@app.query()
@_safe
def describe(msg: Message, context: Context) -> Message:
    task, site, data = _open(context, msg)
    features, counts = task.describe(data)
    info = ConfigRecord({"site-name": site.name, "features": features})
    config = msg.content["config"] if "config" in msg.content.config_records else {}
    if config.get("mode") == "train":  # a training run's site check: can this site's privacy budget carry it?
        counts.update(_privacy_plan(context, msg, task, site, data))
    metrics = MetricRecord({"num-train": len(data.train), "num-test": len(data.test), **counts})
    return Message(RecordDict({"site": info, "metrics": metrics}), reply_to=msg)


@app.train()
@_safe
def train(msg: Message, context: Context) -> Message:
    from client.train import TrainSettings  # torch: imported by the messages that compute only

    task, site, data = _open(context, msg)
    cfg = msg.content["config"]
    server_round = int(cfg["server-round"])
    budget = _budget(context, cfg, task, site, data, server_round)  # a site with a budget trains only with dp
    if cfg.get("objective") == "newton-cox":
        return _newton_step(msg, data)
    if budget is not None:  # refuse a round the budget cannot carry, before any training
        budget.policy.check_privacy(site.name, True, server_round, budget.after(0), budget.after(1))
    model = task.build(data)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
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
    metrics["num-examples"] = len(data.train)
    reply = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)})
    return Message(reply, reply_to=msg)


@dataclasses.dataclass(frozen=True)
class _Budget:
    """One data set's privacy budget as a dp round or run sees it (client/privacy.py)."""

    policy: SitePolicy
    dp: object  # privacy.DPSettings
    store: object  # privacy.PrivacyBudget
    delta: float
    history: list
    sample_rate: float
    steps: int  # per round

    def after(self, rounds: int) -> float:
        from client.privacy import epsilon

        return epsilon(self.history + [(self.dp.noise_multiplier, self.sample_rate, self.steps * rounds)], self.delta)


def _budget(context: Context, cfg, task, site: Site, data, server_round: int | None) -> _Budget | None:
    """The budget of this round's data set, or ``None`` without dp; refuses dp where no ε would hold, and training
    without dp where the policy sets a budget."""
    from client import privacy

    policy = SitePolicy.load(context.node_config.get("policy"), site.name)
    dp = privacy.DPSettings.from_config(cfg)
    policy.check_privacy(site.name, dp is not None, server_round, 0.0, 0.0)
    if dp is None:
        return None
    if getattr(task, "endpoint", None) == "survival":
        raise SiteDataError(f"site {site.name}: {COX_REFUSAL}")
    store = privacy.PrivacyBudget(ledger_folder(context, site), task.fingerprint(site, data))
    rate, steps = privacy.sample_plan(task.privacy_units(data), int(cfg["batch-size"]), int(cfg["local-epochs"]),
                                      int(cfg["local-steps"]))
    return _Budget(policy, dp, store, policy.privacy_delta(dp.delta), store.history(), rate, steps)


def _privacy_plan(context: Context, msg: Message, task, site: Site, data) -> dict[str, float]:
    """What the planned run would spend of this data set's budget, as numbers (the coordinator warns when fewer
    rounds fit than the run asks for); a refusal when not one round fits."""
    cfg = msg.content["config"]
    budget = _budget(context, cfg, task, site, data, None)
    if budget is None:
        return {}
    rounds = int(cfg["num-server-rounds"])
    out = {"epsilon-spent": budget.after(0), "epsilon-planned": budget.after(rounds), "delta": budget.delta,
           "dp-rounds-allowed": float(rounds)}
    maximum = budget.policy.max_epsilon
    if maximum:
        allowed = next((r for r in range(rounds, 0, -1) if budget.after(r) <= maximum), 0)
        budget.policy.check_privacy(site.name, True, 1, out["epsilon-spent"], budget.after(1))  # not one round fits
        out.update({"dp-rounds-allowed": float(allowed), "max-epsilon": maximum})
    return out


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
@_safe
def evaluate(msg: Message, context: Context) -> Message:
    task, _, data = _open(context, msg)
    model = task.build(data)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    started = time.perf_counter()
    metrics = task.evaluate(model, data)
    metrics["eval_seconds"] = time.perf_counter() - started
    metrics["num-examples"] = len(data.test)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate("validate")
@_safe
def validate(msg: Message, context: Context) -> Message:
    """Test one model (``"arrays"``) or several (``"model/<label>"``, cross-site) on this site's test split.

    Figures for each model are prefixed ``<label>::``; subgroups are computed for
    the model under validation only (the sites' own models appear in the matrix).
    """
    task, site, data = _open(context, msg)
    cfg = msg.content["config"]
    policy = SitePolicy.load(context.node_config.get("policy"), site.name)
    policy.check_examples(site.name, len(data.test), task.unit, "validate on")
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
@_safe
def analyse(msg: Message, context: Context) -> Message:
    """Treatment-effect analysis (client/stats.py): counts per arm and bin, or Cox sums per model; never a row."""
    import json

    from client import stats

    started = time.perf_counter()
    cfg = msg.content["config"]
    site = _site(context)
    policy = SitePolicy.load(context.node_config.get("policy"), site.name)
    split = lambda text: [c for c in str(text).split(",") if c]  # noqa: E731
    treatment, subgroups = str(cfg["treatment"]), split(cfg["subgroups"])
    data = stats.load_analysis_data(site.folder, site.name, treatment, split(cfg["covariates"]), subgroups)
    policy.check_examples(site.name, len(data), "patients", "analyse")
    context.state[FINGERPRINT] = ConfigRecord({"data-fingerprint": cohort_fingerprint(site.folder)})
    min_cell = int(cfg["min-cell"])
    if cfg["step"] == "describe":
        metrics = stats.describe(data, subgroups, float(cfg["km-bin"]), min_cell)
    else:
        # the iterations this node answered in this run, kept in its own memory (not the coordinator's word)
        answered = int(context.state[ANALYSIS_STATE]["iterations"]) if ANALYSIS_STATE in context.state else 0
        policy.check_analysis_iteration(site.name, answered + 1)
        context.state[ANALYSIS_STATE] = ConfigRecord({"iterations": answered + 1})
        metrics = stats.cox_sums(data, json.loads(str(cfg["fits"])), min_cell)
    metrics["compute-seconds"] = time.perf_counter() - started
    reply = RecordDict({"site": ConfigRecord({"site-name": site.name}), "metrics": MetricRecord(metrics)})
    return Message(reply, reply_to=msg)
