"""What wraps every message on the node, outermost first: the error boundary, the site's ledger, its policy.

The **error boundary** is the one place where an exception becomes text that
leaves the node (Flower sends a reply's error reason to the coordinator): a
policy refusal becomes a structured ``"refusal"`` record (site, rule, reason),
a :class:`~models.errors.SiteDataError` its own text (written to name the site
and the problem only), and anything else a generic line naming the site and
the handler; the details go to the node's log. It also resolves, once per
message, what the message is about (:class:`Visit`: the effective run config,
the task, the site, its policy), which the inner mods and the handlers read
with :func:`visit`.

The **site ledger** records what this node received, sent, refused or failed,
signed with the site's own key; the **policy** mod refuses, before any data is
read, work the hospital's policy does not accept.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import logging
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from client import secure_update
from client.policy import SitePolicy, installed_app_hash
from client.site import Site, resolve_site
from client.tasks import task_for
from models.builders import model_hash
from models.errors import REFUSAL, PolicyRefusal, SiteDataError
from models.home import fedhosp_home
from models.ledger import Ledger, load_or_create_key

log = logging.getLogger(__name__)

FINGERPRINT = "fedhosp.data"  # context.state: the fingerprint of the data the last message read, for the ledger
MODEL_SPEC_KEYS = ("task", "endpoint", "target", "model", "image-size", "dp")
ANALYSE = "query.analyse"



@dataclasses.dataclass
class Visit:
    """What one message is about, resolved once by the error boundary."""

    msg: Message
    context: Context
    run_config: dict  # the run config, with the task keys of a model under validation
    task: object
    site_or_error: Site | Exception

    @property
    def site(self) -> Site:
        """This node's site; raises the error that kept it from being resolved (a broken node config)."""
        if isinstance(self.site_or_error, Exception):
            raise self.site_or_error
        return self.site_or_error

    @property
    def site_name(self) -> str | None:
        """The site's name, or None when the node config does not say which site this is."""
        return None if isinstance(self.site_or_error, Exception) else self.site_or_error.name

    @functools.cached_property
    def policy(self) -> SitePolicy:
        return SitePolicy.load(self.context.node_config.get("policy"), self.site.name)

    @property
    def config(self) -> ConfigRecord | dict:
        """The message's config (a secure round's masked-vector stage carries it in the legacy FitIns)."""
        return secure_update.train_config(self.msg)

    @property
    def kind(self) -> str:
        """The message type as the ledger names it ("evaluate-validate" for a validation)."""
        return self.msg.metadata.message_type.replace(".", "-")

    @property
    def handler(self) -> str:
        """The handler's name as an error line names it (``train``, ``validate``, ``analyse``, ...)."""
        return self.msg.metadata.message_type.split(".")[-1]

    @property
    def validating(self) -> bool:
        """The coordinator is only testing a model here (a validation, or a cross-site run's describe/evaluate)."""
        kind = self.msg.metadata.message_type
        return kind.endswith(".validate") or (kind == "query" and self.config.get("mode") == "validate")

    @property
    def ledger_folder(self) -> Path:
        """Node config ``ledger-dir``; the default is ``$FEDHOSP_HOME/site-ledgers/<site>``. The privacy budget
        lives there too (``privacy/``)."""
        folder = self.context.node_config.get("ledger-dir")
        return Path(str(folder)) if folder else fedhosp_home() / "site-ledgers" / (self.site_name or "unknown")


_VISIT: contextvars.ContextVar[Visit] = contextvars.ContextVar("fedhosp_visit")


def visit() -> Visit:
    """The message being handled (set by :func:`error_boundary_mod`)."""
    return _VISIT.get()


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


def resolve_visit(msg: Message, context: Context) -> Visit:
    """What ``msg`` is about on this node (the boundary does this once per message)."""
    run_config = effective_run_config(msg, context)
    task = task_for(run_config, dict(context.node_config))
    try:
        site: Site | Exception = resolve_site(dict(context.node_config), str(context.run_config.get("data-root", "")),
                                              task.demo_site)
    except Exception as exc:  # raised again where the site is needed, so that the ledger records it
        site = exc
    return Visit(msg, context, run_config, task, site)


def safe_reason(exc: BaseException, site: str, kind: str) -> str:
    """The text that may leave the node for ``exc``: a contract error's own text, else a generic line."""
    if isinstance(exc, SiteDataError):
        return str(exc)
    return f"site {site}: {kind} failed ({type(exc).__name__}); details are in the node's log"


def refusal_reply(msg: Message, site: str, refusal: PolicyRefusal) -> Message:
    """A refusal as data: the coordinator reads site and rule from the record, never from text."""
    record = ConfigRecord({"site": site, "rule": refusal.rule, "reason": str(refusal)})
    return Message(RecordDict({REFUSAL: record}), reply_to=msg)


def error_boundary_mod(msg: Message, context: Context, call_next) -> Message:
    """The outermost mod: resolve the message's task and site once; turn every exception into a safe reply."""
    site, handler = "unknown", msg.metadata.message_type.split(".")[-1]
    token = None
    try:
        current = resolve_visit(msg, context)
        site = current.site_name or "unknown"
        token = _VISIT.set(current)
        return call_next(msg, context)
    except PolicyRefusal as exc:
        return refusal_reply(msg, site, exc)
    except Exception as exc:
        if not isinstance(exc, SiteDataError):
            log.exception("fedhosp %s failed on this node", handler)
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, safe_reason(exc, site, handler)), reply_to=msg)
    finally:
        if token is not None:
            _VISIT.reset(token)


def site_ledger_mod(msg: Message, context: Context, call_next) -> Message:
    """Record in the site's own signed ledger what this node received, sent, refused or failed."""
    current = visit()
    site = current.site_name
    ledger = site_ledger(current)
    config = dict(current.config)
    stage = secure_update.stage(msg)  # read before Flower's secaggplus_mod consumes it
    entry = {"run_id": context.run_id, "site": site,
             "round": config.get("server-round", int(msg.metadata.group_id) if stage else None),
             "received": {"config": config, **({"secure_aggregation": stage} if stage else {})}}
    if "iteration" in config:
        entry["iteration"] = config["iteration"]
    if "arrays" in msg.content.array_records:
        entry["received"]["model_hash"] = model_hash({k: a.numpy() for k, a in msg.content["arrays"].items()})
    others = {name: record for name, record in msg.content.array_records.items()
              if name not in ("arrays", secure_update.FITINS_ARRAYS)}
    if others:  # a cross-site evaluation sends several models
        entry["received"]["model_hashes"] = {name: model_hash({k: a.numpy() for k, a in record.items()})
                                             for name, record in others.items()}
    try:
        reply = call_next(msg, context)
    except Exception as exc:  # recorded with the text the boundary lets leave the node
        refused = {"refused": exc.rule} if isinstance(exc, PolicyRefusal) else {}
        ledger.append(f"{current.kind}-failed",
                      {**entry, "reason": safe_reason(exc, site or "unknown", current.handler),
                       **refused})
        raise
    sent: dict = {}
    if stage:  # a secure round: what the node masked, never the masked bytes or the keys
        sent = secure_update.ledger_view(stage, reply, context)
    elif msg.metadata.message_type == ANALYSE:  # per-bin counts can be under min-cell: their digest, and the sums
        from client.stats import ledger_view

        sent = ledger_view(dict(reply.content["metrics"]))
    elif "metrics" in reply.content.metric_records:
        metrics = dict(reply.content["metrics"])
        sent["num_examples"] = metrics.pop("num-examples", None)
        sent["metrics"] = metrics
    if "arrays" in reply.content.array_records:
        sent["update_hash"] = model_hash({k: a.numpy() for k, a in reply.content["arrays"].items()})
    fingerprint = context.state.config_records.get(FINGERPRINT)
    ledger.append(current.kind, {**entry, "sent": sent,
                                 "data_fingerprint": fingerprint["data-fingerprint"] if fingerprint else None})
    return reply


def site_ledger(current: Visit) -> Ledger:
    """``<ledger-dir>/run-<id>.jsonl``, signed with ``<ledger-dir>/site_ed25519.pem`` (0600)."""
    folder = current.ledger_folder
    key = load_or_create_key(folder / "site_ed25519.pem")
    return Ledger(folder / f"run-{current.context.run_id}.jsonl", key,
                  {"role": "site", "site": current.site_name, "run_id": current.context.run_id})


def site_policy_mod(msg: Message, context: Context, call_next) -> Message:
    """Enforce the hospital's policy (node config ``policy``) before any data is read."""
    current = visit()
    mode = str(current.run_config.get("mode", "train"))
    rounds = 0 if mode == "analyse" else int(context.run_config.get("num-server-rounds", 0))  # analyses iterate
    current.policy.check_run(current.site.name, str(current.run_config.get("task", "oncology")), rounds,
                             current.config.get("server-round"), installed_app_hash(__file__), mode)
    secure_update.check_policy(current.site.name, msg, current.run_config, current.policy.require_secure_aggregation,
                               current.policy.min_sites)
    return call_next(msg, context)


# The boundary is outermost, so that nothing escapes it; the ledger next, so that what the policy refuses is
# recorded too; Flower's SecAgg+ mod innermost, so that the policy refuses before any key is shared.
MODS = [error_boundary_mod, site_ledger_mod, site_policy_mod, secure_update.secure_aggregation_mod]
