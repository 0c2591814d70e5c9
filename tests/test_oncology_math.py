"""The Cox loss against lifelines, an independent implementation (the C-index: tests/test_metrics.py)."""

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines import CoxPHFitter

from models.oncology import TabularNet, cox_partial_nll
from tests.synthetic import survival_data


def _lifelines_fit(x, t, e):
    df = pd.DataFrame(x, columns=[f"x{i}" for i in range(x.shape[1])])
    df["T"], df["E"] = t, e
    return CoxPHFitter().fit(df, "T", "E")


def test_efron_loss_equals_lifelines_log_likelihood_with_ties():
    x, t, e = survival_data()
    assert len(np.unique(t)) < len(t) / 3  # heavily tied
    fit = _lifelines_fit(x, t, e)
    risk = torch.tensor(x) @ torch.tensor(fit.params_.values)
    nll = cox_partial_nll(risk, torch.tensor(t), torch.tensor(e), reduction="sum")
    assert nll.item() == pytest.approx(-fit.log_likelihood_, rel=1e-9)


def test_breslow_loss_matches_the_textbook_formula():
    x, t, e = survival_data(n=60, seed=3)
    risk = torch.tensor(x @ [0.2, 0.1, -0.4])
    expected = 0.0
    for i in np.flatnonzero(e):
        expected -= risk[i].item() - np.log(np.exp(risk.numpy()[t >= t[i]]).sum())
    got = cox_partial_nll(risk, torch.tensor(t), torch.tensor(e), ties="breslow", reduction="sum")
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_loss_is_finite_for_extreme_risks_and_mean_divides_by_events():
    x, t, e = survival_data(n=50, seed=1)
    risk = torch.tensor(x[:, 0] * 800.0)  # exp() would overflow without the shift
    total = cox_partial_nll(risk, torch.tensor(t), torch.tensor(e), reduction="sum")
    mean = cox_partial_nll(risk, torch.tensor(t), torch.tensor(e))
    assert torch.isfinite(total)
    assert mean.item() == pytest.approx(total.item() / e.sum())


def test_batch_without_events_gives_zero_loss_and_zero_gradient():
    risk = torch.randn(8, requires_grad=True)
    loss = cox_partial_nll(risk, torch.rand(8) + 1, torch.zeros(8))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(risk.grad == 0)


def test_fitting_the_linear_cox_model_recovers_lifelines_coefficients():
    x, t, e = survival_data(n=400, seed=2)
    fit = _lifelines_fit(x, t, e)
    model = TabularNet(3, "linear").double()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe")
    xt, tt, et = torch.tensor(x), torch.tensor(t), torch.tensor(e)

    def closure():
        opt.zero_grad()
        loss = cox_partial_nll(model(xt), tt, et, reduction="sum")
        loss.backward()
        return loss

    opt.step(closure)
    ours = model.net[-1].weight.detach().numpy().reshape(-1)
    np.testing.assert_allclose(ours, fit.params_.values, atol=1e-4)
