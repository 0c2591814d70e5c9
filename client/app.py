"""The hospital node's ClientApp: describe the site, train locally, evaluate locally.

Replies carry only ``"arrays"`` (weights) and ``"metrics"`` (numbers); the
``query`` reply adds the site's name and feature names so that the coordinator
can build the model and label per-site metrics. Exceptions are re-raised with
text that names the site and the problem only, since Flower sends that text to
the coordinator.
"""

from __future__ import annotations

import functools
import logging
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import train as local
from client.data.tabular import SiteCohort, SiteDataError, load_cohort
from client.site import Site, resolve_site
from models.registry import build_model

log = logging.getLogger(__name__)
app = ClientApp()


def _site(context: Context) -> Site:
    rc = context.run_config
    return resolve_site(dict(context.node_config), str(rc.get("data-root", "")), int(rc.get("seed", 42)))


def _cohort(context: Context) -> tuple[Site, SiteCohort]:
    site = _site(context)
    endpoint = str(context.run_config.get("endpoint", "survival"))
    return site, load_cohort(site.folder, site.name, endpoint, int(context.run_config.get("seed", 42)))


def _safe(handler):
    """Let only contract errors' text leave the node; anything else becomes a generic error."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        try:
            return handler(msg, context)
        except SiteDataError:
            raise
        except Exception as exc:
            log.exception("fedhosp %s failed on this node", handler.__name__)
            try:
                name = _site(context).name
            except Exception:
                name = "unknown"
            raise RuntimeError(
                f"site {name}: {handler.__name__} failed ({type(exc).__name__}); details are in the node's log"
            ) from None

    return wrapper


def _model(context: Context, cohort: SiteCohort, arrays: ArrayRecord) -> torch.nn.Module:
    rc = context.run_config
    model = build_model(str(rc["task"]), str(rc["endpoint"]), str(rc["model"]), len(cohort.features))
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


@app.query()
@_safe
def describe(msg: Message, context: Context) -> Message:
    site, cohort = _cohort(context)
    info = ConfigRecord({"site-name": site.name, "features": list(cohort.features)})
    metrics = MetricRecord({"num-train": len(cohort.train), "num-test": len(cohort.test),
                            "skipped-rows": sum(cohort.skipped.values())})
    return Message(RecordDict({"site": info, "metrics": metrics}), reply_to=msg)


@app.train()
@_safe
def train(msg: Message, context: Context) -> Message:
    site, cohort = _cohort(context)
    cfg = msg.content["config"]
    model = _model(context, cohort, msg.content["arrays"])
    settings = local.TrainSettings(
        endpoint=str(context.run_config["endpoint"]),
        local_epochs=int(cfg["local-epochs"]),
        local_steps=int(cfg["local-steps"]),
        batch_size=int(cfg["batch-size"]),
        lr=float(cfg["lr"]),
        proximal_mu=float(cfg.get("proximal-mu", 0.0)),
        seed=int(cfg["seed"]),
    )
    started = time.perf_counter()
    metrics = local.train(model, cohort.train, settings, int(cfg["server-round"]), site.name)
    metrics["train_seconds"] = time.perf_counter() - started
    metrics["num-examples"] = len(cohort.train)
    reply = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)})
    return Message(reply, reply_to=msg)


@app.evaluate()
@_safe
def evaluate(msg: Message, context: Context) -> Message:
    _, cohort = _cohort(context)
    model = _model(context, cohort, msg.content["arrays"])
    started = time.perf_counter()
    metrics = local.evaluate(model, cohort.test, str(context.run_config["endpoint"]))
    metrics["eval_seconds"] = time.perf_counter() - started
    metrics["num-examples"] = len(cohort.test)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
