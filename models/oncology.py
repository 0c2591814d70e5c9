"""Oncology models on tabular cohorts: Cox proportional hazards and treatment response.

Survival uses the Cox partial likelihood, which only needs each site's own risk
sets: every site's loss is a stratified Cox loss over its own patients, so the
coordinator never needs event times. Response is a plain binary classifier on
the same features. Their metrics (C-index, AUC, accuracy) are models/metrics.py's.
"""

from __future__ import annotations

import torch
from torch import nn

ENDPOINTS = ("survival", "response")
MODELS = ("linear", "mlp")


class TabularNet(nn.Module):
    """One output per patient: a log-hazard (survival) or a logit (response).

    ``linear`` is the classic Cox / logistic model; ``mlp`` is DeepSurv-style
    (Katzman et al. 2018): hidden layers with dropout, one linear output.
    """

    def __init__(
        self,
        num_features: int,
        kind: str = "linear",
        hidden: tuple[int, ...] = (32, 16),
        dropout: float = 0.1,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if kind not in MODELS:
            raise ValueError(f"unknown oncology model {kind!r}; choose one of {MODELS}")
        if num_features < 1:
            raise ValueError("an oncology model needs at least one feature")
        self.kind = kind
        layers: list[nn.Module] = []
        width = num_features
        if kind == "mlp":
            for h in hidden:
                layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
                width = h
        # A Cox model has no intercept (it cancels in the partial likelihood);
        # a response model needs one.
        layers.append(nn.Linear(width, 1, bias=bias or kind == "mlp"))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def cox_partial_nll(
    risk: torch.Tensor,
    time: torch.Tensor,
    event: torch.Tensor,
    ties: str = "efron",
    reduction: str = "mean",
) -> torch.Tensor:
    """Negative Cox partial log-likelihood.

    ``risk`` is the linear predictor (log relative hazard). Tied event times are
    handled with Efron's (default, as lifelines and R's ``coxph``) or Breslow's
    approximation. Numerically stable: risk sets are summed in log space
    (``logcumsumexp``), so no exponential over- or underflows. ``reduction="mean"``
    divides by the number of events (0 when a batch has no event, with a
    gradient of zero), ``"sum"`` returns the total.
    """
    if ties not in ("efron", "breslow"):
        raise ValueError(f"ties must be 'efron' or 'breslow', not {ties!r}")
    risk = risk.reshape(-1)
    time = time.reshape(-1).to(risk.dtype)
    event = event.reshape(-1).to(risk.dtype)
    n_events = event.sum()
    if n_events.item() == 0:
        return risk.sum() * 0.0

    # Sort by time, descending, so a running log-sum-exp gives each risk set.
    order = torch.argsort(time, descending=True, stable=True)
    risk, time, event = risk[order], time[order], event[order]

    # Group equal times: group g spans a contiguous block (descending time).
    _, inverse, counts = torch.unique_consecutive(time, return_inverse=True, return_counts=True)
    n_groups = counts.shape[0]
    group_last = torch.cumsum(counts, 0) - 1  # index of the last member of each group
    log_risk_set = torch.logcumsumexp(risk, 0)[group_last]  # log sum exp(risk) over time >= t_g

    is_event = event > 0
    ev_group = inverse[is_event]
    log_denominator = log_risk_set[ev_group]
    if ties == "efron":
        # The l-th of d tied events (l = 0..d-1) sees R - (l/d) * D, i.e.
        # log R + log(1 - (l/d) * D/R) with D/R <= 1 computed without overflow.
        tied_n = torch.zeros(n_groups, dtype=risk.dtype).index_add(0, inverse, event)
        share = torch.exp(risk - log_risk_set[inverse]) * event
        tied_share = torch.zeros(n_groups, dtype=risk.dtype).index_add(0, inverse, share)
        # Groups are contiguous, so the events before group g number
        # cumsum(tied_n)[g] - tied_n[g]; an event's rank in its group follows.
        ev_rank = (torch.cumsum(event, 0) - 1)[is_event]
        ell = ev_rank - (torch.cumsum(tied_n, 0) - tied_n)[ev_group]
        log_denominator = log_denominator + torch.log1p(-(ell / tied_n[ev_group]) * tied_share[ev_group])
    nll = -(risk[is_event].sum() - log_denominator.sum())
    if reduction == "sum":
        return nll
    return nll / n_events


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
