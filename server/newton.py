"""The exact federated Cox fit: Newton–Raphson on gradients and Hessians summed over the sites.

A Cox model stratified by site has a log partial likelihood that is a sum over
sites, so its gradient and Hessian are too: each site computes its stratum's
(client/stats.py), the coordinator adds them and takes the Newton step. The
result is the fit a statistician gets with every row in one place (lifelines'
``CoxPHFitter(strata=["site"])``), to numerical precision, in a handful of
iterations. Used by the analysis mode (server/analyse.py) and, as
``strategy = "newton"``, to train the linear Cox model (NewtonCox below).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp.strategy import FedAvg

MAX_ITERATIONS = 25  # also the sites' default cap (client/policy.py): each iteration is a query of their data
STEP_TOLERANCE = 1e-9  # largest coefficient change that still counts as moving
DIVERGED = 25.0  # |coefficient| beyond this (a hazard ratio of e^25): separation, not an estimate
Z975 = 1.959963984540054


class FitError(ValueError):
    """A Cox fit that cannot give an estimate (separation, collinearity); the message names the model."""


@dataclass
class NewtonFit:
    """One Cox model's Newton iterations. ``penalty`` adds ``-0.5 * sum(penalty * beta**2)`` to the log-likelihood."""

    name: str
    terms: list[str]
    where: dict | None = None
    penalty: np.ndarray | None = None
    tolerance: float = STEP_TOLERANCE
    beta: np.ndarray = field(default=None)
    iterations: int = 0
    converged: bool = False
    loglik: float = float("nan")
    hessian: np.ndarray | None = None
    _previous: tuple[np.ndarray, float, np.ndarray] | None = None  # (beta, loglik, step) of the last accepted point
    _step: float = 1.0

    def __post_init__(self):
        if self.beta is None:
            self.beta = np.zeros(len(self.terms))
        if self.penalty is None:
            self.penalty = np.zeros(len(self.terms))

    def request(self) -> dict:
        """What the sites need for this model: data only (term names, the rows, the coefficients)."""
        return {"terms": self.terms, "where": self.where, "beta": [float(b) for b in self.beta]}

    def update(self, loglik: float, gradient: np.ndarray, hessian: np.ndarray) -> None:
        """Take the summed log-likelihood, gradient and Hessian at ``beta``; move to the next point or stop."""
        self.iterations += 1
        loglik = loglik - 0.5 * float(np.sum(self.penalty * self.beta ** 2))
        gradient = gradient - self.penalty * self.beta
        hessian = hessian - np.diag(self.penalty)
        if not (np.isfinite(loglik) and np.isfinite(gradient).all() and np.isfinite(hessian).all()):
            raise FitError(f"Cox model '{self.name}': the likelihood is not finite at iteration {self.iterations}")
        if self._previous is not None and loglik < self._previous[1] - 1e-10 * abs(self._previous[1]) \
                and self._step > 1e-4:
            # the full step overshot: go back and take half of it (the sums here are at a point we reject)
            self._step /= 2
            base, _, delta = self._previous
            self.beta = base + self._step * delta
            return
        try:
            delta = np.linalg.solve(-hessian, gradient)
        except np.linalg.LinAlgError:
            raise FitError(f"Cox model '{self.name}': the Hessian is singular; terms {self.terms} are collinear "
                           "or one does not vary within the sites") from None
        self.loglik, self.hessian = loglik, hessian
        if np.max(np.abs(delta), initial=0.0) < self.tolerance:
            self.converged = True
            self.beta = self.beta + delta  # the last, tiny step: its error is of the order of delta squared
            return
        if np.max(np.abs(self.beta), initial=0.0) > DIVERGED:
            worst = self.terms[int(np.argmax(np.abs(self.beta)))]
            raise FitError(f"Cox model '{self.name}' does not converge: the coefficient of '{worst}' diverges "
                           "(separation: e.g. no events in one arm)")
        self._previous, self._step = (self.beta.copy(), loglik, delta), 1.0
        self.beta = self.beta + delta

    def check_converged(self) -> None:
        if not self.converged:
            raise FitError(f"Cox model '{self.name}' did not converge in {self.iterations} Newton iterations")

    def table(self) -> dict[str, dict[str, float]]:
        """Per term: coef, se, hr with its 95 % interval, Wald p (the Hessian at the optimum, natural units)."""
        from scipy.stats import norm

        covariance = np.linalg.inv(-self.hessian)
        out = {}
        for i, term in enumerate(self.terms):
            coef, se = float(self.beta[i]), float(np.sqrt(covariance[i, i]))
            out[term] = {"coef": coef, "se": se, "hr": float(np.exp(coef)),
                         "hr_low": float(np.exp(coef - Z975 * se)), "hr_high": float(np.exp(coef + Z975 * se)),
                         "p": float(2 * norm.sf(abs(coef / se)))}
        return out


class NewtonCox(FedAvg):
    """``strategy = "newton"``: train the linear Cox model by exact Newton steps instead of local SGD.

    Each round the sites return, with the weights they received unchanged, their
    stratum's gradient and Hessian (and sums of x and x² for the penalty's scale);
    the coordinator takes one Newton step of the site-stratified Cox model with
    lifelines' L2 ``penalizer`` (``n * penalizer / 2 * sum((beta * sd)**2)``, sd
    of the pooled training features), and stops moving once converged. No
    learning rate, no batch size, a handful of rounds.
    """

    def __init__(self, penalizer: float, **kwargs):
        super().__init__(**kwargs)
        self.penalizer = penalizer
        self.fit: NewtonFit | None = None
        self.key: str | None = None

    @property
    def converged(self) -> bool:
        return bool(self.fit and self.fit.converged)

    def configure_train(self, server_round: int, arrays, config, grid):
        config = ConfigRecord({**dict(config), "objective": "newton-cox"})
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies):
        replies = [r for r in replies if not r.has_error() and "newton" in r.content.array_records]
        if not replies:
            return None, None
        (self.key, weights), = next(iter(replies)).content["arrays"].items()
        beta = weights.numpy().reshape(-1).astype(np.float64)
        sums = {k: sum(r.content["newton"][k].numpy().astype(np.float64) for r in replies)
                for k in ("gradient", "hessian", "loglik", "sum_x", "sum_x2", "n")}
        n = float(sums["n"][0])
        if self.fit is None:
            sd = np.sqrt((sums["sum_x2"] - sums["sum_x"] ** 2 / n) / (n - 1))
            self.fit = NewtonFit("newton", [f"w{i}" for i in range(len(beta))], penalty=n * self.penalizer * sd ** 2,
                                 beta=beta, tolerance=1e-6)  # float32 weights: 1e-6 is their resolution here
        if not self.fit.converged:
            self.fit.beta = beta  # exactly what the sites evaluated at
            self.fit.update(float(sums["loglik"][0]), sums["gradient"], sums["hessian"].reshape(len(beta), -1))
        new = self.fit.beta.astype(weights.numpy().dtype).reshape(weights.numpy().shape)
        metrics = MetricRecord({"loglik": float(sums["loglik"][0]), "newton_converged": int(self.fit.converged),
                                "newton_iterations": self.fit.iterations})
        return ArrayRecord({self.key: Array(np.ascontiguousarray(new))}), metrics
