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

from client.data.tabular import SiteDataError
from client.site import Site, resolve_site
from client.tasks import task_for
from client.train import TrainSettings

log = logging.getLogger(__name__)
app = ClientApp()


def _open(context: Context):
    """The task, this node's site and its data (read through the task's reader and cache)."""
    task = task_for(dict(context.run_config), dict(context.node_config))
    site = _site(context, task)
    return task, site, task.load(site)


def _site(context: Context, task=None) -> Site:
    task = task or task_for(dict(context.run_config), dict(context.node_config))
    return resolve_site(dict(context.node_config), str(context.run_config.get("data-root", "")), task.demo_site)


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


@app.query()
@_safe
def describe(msg: Message, context: Context) -> Message:
    task, site, data = _open(context)
    features, counts = task.describe(data)
    info = ConfigRecord({"site-name": site.name, "features": features})
    metrics = MetricRecord({"num-train": len(data.train), "num-test": len(data.test), **counts})
    return Message(RecordDict({"site": info, "metrics": metrics}), reply_to=msg)


@app.train()
@_safe
def train(msg: Message, context: Context) -> Message:
    task, site, data = _open(context)
    cfg = msg.content["config"]
    model = task.build(data)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    settings = TrainSettings(
        local_epochs=int(cfg["local-epochs"]),
        local_steps=int(cfg["local-steps"]),
        batch_size=int(cfg["batch-size"]),
        lr=float(cfg["lr"]),
        proximal_mu=float(cfg.get("proximal-mu", 0.0)),
        seed=int(cfg["seed"]),
    )
    started = time.perf_counter()
    metrics = task.train(model, data, settings, int(cfg["server-round"]), site.name)
    metrics["train_seconds"] = time.perf_counter() - started
    metrics["num-examples"] = len(data.train)
    reply = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)})
    return Message(reply, reply_to=msg)


@app.evaluate()
@_safe
def evaluate(msg: Message, context: Context) -> Message:
    task, _, data = _open(context)
    model = task.build(data)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    started = time.perf_counter()
    metrics = task.evaluate(model, data)
    metrics["eval_seconds"] = time.perf_counter() - started
    metrics["num-examples"] = len(data.test)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
