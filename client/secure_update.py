"""The node's side of secure aggregation: what it accepts, and the bounded update it masks.

Under secure aggregation (server/secure_aggregation.py) the coordinator cannot
check one site's update, so the node checks its own before Flower's
``secaggplus_mod`` masks it: every value finite (else nothing is sent), and an
L2 norm of at most the train config's ``secure-update-norm`` (a larger update is
scaled down to it, which the site's ledger records). The same bound is the
protocol's quantisation range, so no value is clipped twice.

The site's policy can insist on it (``require-secure-aggregation``), and on a
smallest group to hide in (``min-sites``, default 3): a round set up with fewer
sites is refused before the node shares any key.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, Message

from models.errors import PolicyRefusal, SiteDataError

SECAGG_RECORD = "secaggplus_configs"  # flwr.common.secure_aggregation.secaggplus_constants.RECORD_KEY_CONFIGS
FITINS_ARRAYS, FITINS_CONFIG = "fitins.parameters", "fitins.config"
SENT = "fedhosp.secure-update"  # context.state: what the last masked-vector stage sent, for the site ledger


def is_secure(msg: Message) -> bool:
    """A stage of the SecAgg+ protocol (a train message carrying its config record)."""
    return msg.metadata.message_type == "train" and SECAGG_RECORD in msg.content.config_records


def stage(msg: Message) -> str:
    return str(msg.content[SECAGG_RECORD].get("stage", "")) if is_secure(msg) else ""


def train_config(msg: Message) -> ConfigRecord | dict:
    """The train config of a masked-vector stage (it travels in the legacy FitIns); else the message's own."""
    if FITINS_CONFIG in msg.content.config_records:
        return msg.content[FITINS_CONFIG]
    return msg.content["config"] if "config" in msg.content.config_records else {}


def check_policy(site: str, msg: Message, run_config: dict, require: bool, min_sites: int) -> None:
    """Refuse what the site's policy does not accept: work without secure aggregation when it is required,
    and a secure round among fewer than ``min_sites`` sites (as the coordinator sets it up, and as the keys
    this node is handed show)."""
    kind = msg.metadata.message_type
    if require:
        plain_train = kind == "train" and not is_secure(msg)
        plain_run = kind == "query" and str(run_config.get("mode", "train")) == "train" \
            and not bool(run_config.get("secure-aggregation", False))
        if plain_train or plain_run:
            raise PolicyRefusal(f"site {site}: policy refuses training without secure aggregation "
                                "(require-secure-aggregation); run with secure-aggregation = true",
                                rule="require-secure-aggregation")
    if not is_secure(msg):
        return
    configs = msg.content[SECAGG_RECORD]
    current = str(configs.get("stage", ""))
    if current == "setup":
        sites = int(configs.get("sample_num", 0))
    elif current == "share_keys":  # the public keys of this node's group, its own included
        sites = sum(1 for key in configs.keys() if key != "stage")
    else:
        return
    if sites < min_sites:
        raise PolicyRefusal(f"site {site}: policy refuses a secure round among {sites} sites "
                            f"(min-sites = {min_sites})", rule="min-sites")


@dataclass
class SecureInstruction:
    """A masked-vector stage's instruction: the global model's arrays (by name) and the train config."""

    arrays: dict[str, np.ndarray]
    config: dict
    keys: list[str]  # the arrays whose update is sent, in order
    bound: float


def instruction(msg: Message, model_keys: list[str]) -> SecureInstruction:
    """Read the legacy FitIns the protocol carries; the arrays come in the model's own order."""
    record = msg.content[FITINS_ARRAYS]
    values = [a.numpy() for a in record.values()]
    if len(values) != len(model_keys):
        raise ValueError(f"the secure round sent {len(values)} arrays; this model has {len(model_keys)}")
    config = dict(msg.content[FITINS_CONFIG])
    keys = [k for k in str(config.get("secure-keys", "")).split(",") if k]
    unknown = sorted(set(keys) - set(model_keys))
    if unknown:
        raise ValueError(f"the secure round names arrays the model does not have: {unknown[:3]}")
    return SecureInstruction(dict(zip(model_keys, values)), config, keys, float(config.get("secure-update-norm", 0.0)))


def bounded_update(site: str, trained: dict[str, np.ndarray], ins: SecureInstruction
                   ) -> tuple[list[np.ndarray], dict[str, float]]:
    """The update (trained − global) over the secure keys, finite and within the L2 bound; and its record."""
    update = [np.asarray(trained[k], dtype=np.float64) - ins.arrays[k].astype(np.float64) for k in ins.keys]
    if not all(np.isfinite(u).all() for u in update):
        raise SiteDataError(f"site {site}: the trained model is not finite (NaN or infinity); "
                            "nothing was sent in this secure round")
    norm = float(np.sqrt(sum(float(np.sum(u * u)) for u in update)))
    scale = 1.0
    if ins.bound > 0 and norm > ins.bound:
        scale = ins.bound / norm
        update = [u * scale for u in update]
    return update, {"norm": norm, "scale": scale, "bound": ins.bound}


def reply(msg: Message, update: list[np.ndarray], num_examples: int, metrics: dict[str, float]) -> Message:
    """The legacy FitRes that ``secaggplus_mod`` quantises and masks (it clears the arrays before they leave)."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([u.astype(np.float64) for u in update]),
                    int(num_examples), scalars)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def secure_aggregation_mod(msg: Message, context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for the protocol's messages; every other message passes untouched
    (Flower's mod would take a plain train message for a broken protocol stage)."""
    if not is_secure(msg):
        return call_next(msg, context)
    from flwr.client.mod import secaggplus_mod

    if stage(msg) == "collect_masked_vectors":
        seed_rounding(msg)
    return secaggplus_mod(msg, context, call_next)


def seed_rounding(msg: Message) -> None:
    """Seed the stochastic rounding of Flower's quantisation (numpy's global generator) by the run's seed, the
    round and the node, so that a secure run repeats as a plain one does. It only makes the rounding unbiased;
    the masks, which hide the update, come from keys and seeds of the protocol's own."""
    import hashlib

    from client.mods import visit

    config = train_config(msg)
    text = f"{config.get('seed', 0)}/{config.get('server-round', 0)}/{visit().site_name}"
    np.random.seed(int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little"))


def ledger_view(current_stage: str, reply: Message, context) -> dict:
    """What a protocol stage sent, for the site's ledger: the stage, and at the masked-vector stage the
    training figures and the hash, norm and scaling of the update before masking (never the masked bytes
    or the keys)."""
    view: dict = {"secure_aggregation": current_stage}
    if current_stage == "collect_masked_vectors" and SENT in context.state.config_records:
        view.update(dict(context.state[SENT]))
        if "fitres.metrics" in reply.content.config_records:
            view["metrics"] = dict(reply.content["fitres.metrics"])
            view["num_examples"] = reply.content["fitres.num_examples"]["num_examples"]
    return view


def remember(context, ins: SecureInstruction, update: list[np.ndarray], record: dict[str, float]) -> None:
    """Leave what this stage masks in ``context.state`` for the site ledger (hashes by array name, as the
    coordinator's ledger hashes its global model)."""
    from models.builders import model_hash

    context.state[SENT] = ConfigRecord({"received_model_hash": model_hash(ins.arrays),
                                        "update_hash": model_hash(dict(zip(ins.keys, update))),
                                        "update_norm": record["norm"], "update_scale": record["scale"],
                                        "update_bound": record["bound"]})

