"""Test-only ClientApp: the honest fedhosp ClientApp, with chosen sites sending poisoned updates.

Run-config ``poison`` = "Site:kind,…" with kind nan | scale (x1000 update) | shape | examples (x1000).
"""

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.app import app as honest
from client.mods import resolve_visit

app = ClientApp()


def _poison(msg: Message, context: Context) -> Message:
    reply = honest(msg, context)
    plan = dict(item.split(":") for item in str(context.run_config.get("poison", "")).split(",") if item)
    kind = plan.get(resolve_visit(msg, context).site.name)
    if not kind or reply.has_error():
        return reply
    sent = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    arrays = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    metrics = dict(reply.content["metrics"])
    first = next(iter(arrays))
    if kind == "nan":
        arrays[first] = np.full_like(arrays[first], np.nan)
    elif kind == "scale":
        arrays = {k: (sent[k] + 1000 * (v - sent[k])).astype(v.dtype) for k, v in arrays.items()}
    elif kind == "shape":
        arrays[first] = np.concatenate([arrays[first], arrays[first]])
    elif kind == "examples":
        metrics["num-examples"] = int(metrics["num-examples"]) * 1000
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return Message(RecordDict({"arrays": record, "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _poison(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return honest(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return honest(msg, context)
