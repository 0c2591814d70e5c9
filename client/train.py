"""Local training and evaluation on one site's data. No Flower imports here.

Training is seeded by (seed, round, site) so that a round can be replayed with
the same result, which resuming a run relies on. One loop serves every task;
each task supplies the loss of a minibatch.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from client.privacy import DPSettings
from models.metrics import Predictions, round_metrics, sigmoid
from models.oncology import cox_partial_nll, response_loss


@dataclass(frozen=True)
class TrainSettings:
    local_epochs: int = 1
    local_steps: int = 0  # > 0: exactly this many minibatch steps instead of epochs
    batch_size: int = 64
    lr: float = 0.01
    proximal_mu: float = 0.0
    seed: int = 42
    device: str = "cpu"  # radiology: where the model and each batch go (client/hardware.py)
    dp: DPSettings | None = None  # DP-SGD through Opacus (client/privacy.py)


def round_seed(seed: int, server_round: int, site: str) -> int:
    return int(np.random.SeedSequence([seed, server_round, zlib.crc32(site.encode())]).generate_state(1)[0])


def _minibatches(n: int, cfg: TrainSettings, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches for ``local_epochs`` epochs, or exactly ``local_steps`` steps when set."""
    batch = max(1, min(cfg.batch_size, n))
    steps = 0
    epoch = 0
    while (cfg.local_steps > 0 and steps < cfg.local_steps) or (cfg.local_steps <= 0 and epoch < cfg.local_epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch):
            yield order[start : start + batch]
            steps += 1
            if 0 < cfg.local_steps <= steps:
                return
        epoch += 1


def fit(model: nn.Module, n: int, batch_loss: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
        cfg: TrainSettings, server_round: int, site: str) -> dict[str, float]:
    """Adam on ``batch_loss`` (plus FedProx's proximal term when ``proximal_mu > 0``); DP-SGD when ``cfg.dp``.

    Under dp the metrics add Opacus' accountant figures of the round: ``noise_multiplier``,
    ``sample_rate`` and ``dp_steps``.

    Integer buffers (BatchNorm's ``num_batches_tracked``) end as they began: with BatchNorm's momentum they steer
    nothing, and a count of this site's minibatches would make every distance between updates (the update
    checks, Krum, Bulyan) measure the sites' sizes instead of what they learnt.
    """
    counters = {name: b.clone() for name, b in model.named_buffers() if not b.is_floating_point()}
    metrics = _fit(model, n, batch_loss, cfg, server_round, site)
    for name, buffer in model.named_buffers():
        if name in counters:
            buffer.copy_(counters[name])
    return metrics


def _fit(model: nn.Module, n: int, batch_loss: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
         cfg: TrainSettings, server_round: int, site: str) -> dict[str, float]:
    seed = round_seed(cfg.seed, server_round, site)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if cfg.dp is not None:
        from client.privacy import private_fit

        losses, history = private_fit(model, n, batch_loss, torch.optim.Adam(model.parameters(), lr=cfg.lr), cfg.dp,
                                      cfg.batch_size, cfg.local_epochs, cfg.local_steps, generator)
        (noise_multiplier, sample_rate, steps), = history  # one noise and one rate per round
        return {"train_loss": float(np.mean(losses)) if losses else float("nan"), "local_steps": float(len(losses)),
                "noise_multiplier": float(noise_multiplier), "sample_rate": float(sample_rate),
                "dp_steps": float(steps)}
    global_params = [p.detach().clone() for p in model.parameters()] if cfg.proximal_mu > 0 else None
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model.train()
    losses: list[float] = []
    for idx in _minibatches(n, cfg, generator):
        loss = batch_loss(idx, generator)
        if global_params is not None:
            prox = sum(((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params))
            loss = loss + 0.5 * cfg.proximal_mu * prox
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    return {"train_loss": float(np.mean(losses)) if losses else float("nan"), "local_steps": float(len(losses))}


def train_tabular(model: nn.Module, data, endpoint: str, cfg: TrainSettings, server_round: int,
                  site: str) -> dict[str, float]:
    x, time, event = torch.from_numpy(data.x), torch.from_numpy(data.time), torch.from_numpy(data.event)
    label = torch.from_numpy(data.label) if data.label is not None else None

    def batch_loss(idx, _generator):
        out = model(x[idx])
        if not len(idx):  # an empty Poisson batch (dp): a zero loss through the model
            return out.sum()
        return cox_partial_nll(out, time[idx], event[idx]) if endpoint == "survival" else response_loss(out, label[idx])

    return fit(model, len(data), batch_loss, cfg, server_round, site)


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Training-only augmentation with MONAI transforms, seeded from the round's generator."""
    from monai.transforms import Compose, RandAffine, RandGaussianNoise, RandScaleIntensity

    transform = Compose([
        RandAffine(prob=0.7, rotate_range=0.1, translate_range=(3, 3), scale_range=0.05, padding_mode="border"),
        RandScaleIntensity(factors=0.1, prob=0.5),
        RandGaussianNoise(prob=0.3, std=0.05),
    ])
    transform.set_random_state(seed=int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    return torch.stack([torch.as_tensor(transform(img)) for img in images]).float()


def train_images(model: nn.Module, data, cfg: TrainSettings, server_round: int, site: str,
                 augment: bool = True) -> dict[str, float]:
    """Train on ``cfg.device``: the model moves there, each (augmented, on the CPU) batch follows it;
    the weights come back to host memory for the reply."""
    device = torch.device(cfg.device)
    images, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    loss_fn = nn.CrossEntropyLoss()
    model.to(device)

    rows = torch.arange(len(data))
    if cfg.dp is not None:  # the unit of privacy is the patient: one image of each, drawn afresh every round
        rows = one_image_per_patient(data.patients, torch.Generator().manual_seed(
            round_seed(cfg.seed, server_round, site) + 1))

    def batch_loss(idx, generator):
        idx = rows[idx]
        if not len(idx):  # an empty Poisson batch (dp): a zero loss through the model
            return model(images[idx].to(device)).sum()
        batch = _augment(images[idx], generator) if augment else images[idx]
        return loss_fn(model(batch.to(device)), labels[idx].to(device))

    try:
        return fit(model, len(rows), batch_loss, cfg, server_round, site)
    finally:
        model.to("cpu")


def one_image_per_patient(patients: np.ndarray, generator: torch.Generator) -> torch.Tensor:
    """The index of one image per patient (patients numbered 0..k-1), drawn with ``generator``."""
    patients = torch.as_tensor(np.asarray(patients))
    order = torch.randperm(len(patients), generator=generator)
    first = {}
    for i in order.tolist():
        first.setdefault(int(patients[i]), i)
    return torch.tensor(sorted(first.values()), dtype=torch.long)


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch: int = 256, device: str = "cpu") -> np.ndarray:
    model.eval().to(device)
    try:
        return np.concatenate([model(torch.from_numpy(x[i : i + batch]).to(device)).cpu().numpy()
                               for i in range(0, len(x), batch)]).astype(np.float64)
    finally:
        model.to("cpu")


def tabular_predictions(out: np.ndarray, data, endpoint: str) -> Predictions:
    """A split with the model's outputs (risk, or P(response)): what evaluation and validation both measure."""
    if endpoint == "survival":
        return Predictions("survival", out, data.time, data.event, groups=data.groups)
    return Predictions("response", sigmoid(out), data.label, groups=data.groups)


def image_predictions(logits: np.ndarray, data, target: str) -> Predictions:
    """A split with the class probabilities (kl-grade), or P(class 1) (referral, binary), and the patients."""
    from models.radiology import BINARY_TARGETS

    prob = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    score = prob[:, 1] if target in BINARY_TARGETS else prob
    return Predictions(target, score, data.labels, clusters=data.patients, groups=data.groups)


def evaluate_tabular(model: nn.Module, data, endpoint: str) -> dict[str, float]:
    """Loss and the endpoint's metrics on one split (full batch), by models/metrics.py as a validation's."""
    out = predict(model, data.x)
    if endpoint == "survival":
        loss = cox_partial_nll(torch.from_numpy(out), torch.from_numpy(data.time), torch.from_numpy(data.event))
    else:
        loss = response_loss(torch.from_numpy(out), torch.from_numpy(data.label))
    return {"loss": float(loss), **round_metrics(tabular_predictions(out, data, endpoint))}


def evaluate_images(model: nn.Module, data, target: str, device: str = "cpu") -> dict[str, float]:
    """Cross-entropy and the target's metrics on one split, by models/metrics.py as a validation's."""
    logits = predict(model, data.images, device=device)
    loss = nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(data.labels))
    return {"loss": float(loss), **round_metrics(image_predictions(logits, data, target))}
