"""Local training and evaluation on one site's cohort. No Flower imports here.

Training is seeded by (seed, round, site) so that a round can be replayed with
the same result, which resuming a run relies on.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from client.data.tabular import Split
from models.oncology import binary_metrics, concordance_index, cox_partial_nll, response_loss


@dataclass(frozen=True)
class TrainSettings:
    endpoint: str = "survival"
    local_epochs: int = 1
    local_steps: int = 0  # > 0: exactly this many minibatch steps instead of epochs
    batch_size: int = 64
    lr: float = 0.01
    proximal_mu: float = 0.0
    seed: int = 42


def round_seed(seed: int, server_round: int, site: str) -> int:
    return int(np.random.SeedSequence([seed, server_round, zlib.crc32(site.encode())]).generate_state(1)[0])


def _loss(model: nn.Module, endpoint: str, x, time, event, label) -> torch.Tensor:
    out = model(x)
    if endpoint == "survival":
        return cox_partial_nll(out, time, event)
    return response_loss(out, label)


def train(model: nn.Module, data: Split, cfg: TrainSettings, server_round: int, site: str) -> dict[str, float]:
    """Train in place; returns the mean training loss and the number of steps taken."""
    generator = torch.Generator().manual_seed(round_seed(cfg.seed, server_round, site))
    torch.manual_seed(round_seed(cfg.seed, server_round, site))
    x = torch.from_numpy(data.x)
    time = torch.from_numpy(data.time)
    event = torch.from_numpy(data.event)
    label = torch.from_numpy(data.label) if data.label is not None else None
    n = len(data)
    batch = max(1, min(cfg.batch_size, n))
    global_params = [p.detach().clone() for p in model.parameters()] if cfg.proximal_mu > 0 else None
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model.train()
    losses: list[float] = []
    steps_wanted = cfg.local_steps if cfg.local_steps > 0 else None
    epochs = cfg.local_epochs if steps_wanted is None else 10**9
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            loss = _loss(model, cfg.endpoint, x[idx], time[idx], event[idx], None if label is None else label[idx])
            if global_params is not None:
                prox = sum(((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params))
                loss = loss + 0.5 * cfg.proximal_mu * prox
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            steps += 1
            if steps_wanted is not None and steps >= steps_wanted:
                break
        if steps_wanted is not None and steps >= steps_wanted:
            break
    return {"train_loss": float(np.mean(losses)) if losses else float("nan"), "local_steps": float(steps)}


@torch.no_grad()
def predict(model: nn.Module, data: Split) -> np.ndarray:
    model.eval()
    return model(torch.from_numpy(data.x)).numpy().astype(np.float64)


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, endpoint: str) -> dict[str, float]:
    """Loss and the endpoint's metrics on one split (full batch)."""
    out = predict(model, data)
    if endpoint == "survival":
        loss = cox_partial_nll(torch.from_numpy(out), torch.from_numpy(data.time), torch.from_numpy(data.event))
        return {"loss": float(loss), "c_index": concordance_index(data.time, out, data.event)}
    loss = response_loss(torch.from_numpy(out), torch.from_numpy(data.label))
    return {"loss": float(loss), **binary_metrics(out, data.label)}
