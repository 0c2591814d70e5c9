"""One builder per task, used by both the coordinator and the sites.

Both sides must build exactly the same module from the same run config so that
state-dict keys, shapes and dtypes match; the model hash makes "the same
weights" checkable from logs on either side.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported when a model is built: a site-check message never needs it
    import torch
    from torch import nn

TASKS = ("oncology", "radiology")
DEFAULT_MODEL = {"oncology": "linear", "radiology": "small-cnn"}


def build_model(task: str, model: str, *, endpoint: str = "survival", num_features: int = 0,
                target: str = "kl-grade", image_size: int = 64, private: bool = False) -> nn.Module:
    """Build the task's network with fixed initial weights.

    oncology: ``endpoint`` and ``num_features`` (from the sites' common schema);
    radiology: ``target`` and ``image_size``. ``private`` (run-config ``dp``): the
    network as Opacus can train it (``ModuleValidator.fix``: BatchNorm becomes GroupNorm).
    """
    model = _build(task, model, endpoint, num_features, target, image_size)
    if private:
        from opacus.validators import ModuleValidator

        if ModuleValidator.validate(model, strict=False):
            model = ModuleValidator.fix(model)
    return model


def _build(task: str, model: str, endpoint: str, num_features: int, target: str, image_size: int) -> nn.Module:
    import torch

    from models.oncology import ENDPOINTS, TabularNet
    from models.radiology import build_radiology_model

    torch.manual_seed(0)  # identical initial weights wherever the model is built
    if task == "oncology":
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; choose one of {ENDPOINTS}")
        return TabularNet(num_features, kind=model, bias=endpoint == "response")
    if task == "radiology":
        return build_radiology_model(model, target, image_size)
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


def model_hash(arrays: Mapping[str, np.ndarray | torch.Tensor]) -> str:
    """SHA-256 over the weights, independent of where they were computed.

    Hashes, for each tensor in sorted name order: the name, dtype, shape and the
    little-endian C-order bytes. A state dict and the ArrayRecord made from it
    hash the same (pass ``{k: a.numpy() for k, a in record.items()}``).
    """
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = arrays[name]
        torch = sys.modules.get("torch")  # a tensor exists only once torch is imported
        if torch is not None and isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        value = np.ascontiguousarray(value)
        value = value.astype(value.dtype.newbyteorder("<"), copy=False)
        digest.update(name.encode())
        digest.update(str(value.dtype.str).encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()
