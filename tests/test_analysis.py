"""The analysis' arithmetic: site sums, combined as the coordinator combines them, equal the pooled-data answer.

Oracles: lifelines (stratified Cox, Kaplan–Meier) and statsmodels (stratified
log-rank) on all rows in one place. The ClientApp is called as a SuperNode calls it.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord, MessageType, RecordDict
from lifelines import CoxPHFitter, KaplanMeierFitter

from client.data import demo
from models.errors import SiteDataError
from models.ledger import read_records
from client.stats import describe, load_analysis_data, time_bins
from server.analyse import Request, kaplan_meier, logrank, plan_fits
from server.newton import FitError, NewtonFit
from tests.test_client_app import _context, _message
from tests.node_replies import refusal

COVARIATES = ["age", "stage", "ecog"]
SUBGROUPS = ["mutation", "sex"]
KM_BIN = 30.0


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    return demo.write_demo(root, 5)


def _data(sites):
    return [load_analysis_data(f, f.name, "treatment", COVARIATES, SUBGROUPS) for f in sites]


# lifelines' default stop (relative change of the log-likelihood under 1e-9) can leave 5e-6 in a coefficient;
# run to convergence, it is the reference to 1e-9.
CONVERGED = {"precision": 1e-12, "r_precision": 1e-15, "max_steps": 100}


def cox(frame: pd.DataFrame) -> CoxPHFitter:
    return CoxPHFitter().fit(frame, "time", "event", strata=["site"], fit_options=CONVERGED)


def _pooled(sites) -> pd.DataFrame:
    return pd.concat([pd.read_csv(f / "cohort.csv").assign(site=f.name) for f in sites], ignore_index=True)


class Coordinator:
    """The coordinator's combination, with the sites answered in-process (no Flower): server/analyse.py's own code."""

    def __init__(self, data, min_cell=10, subgroups=SUBGROUPS):
        from client.stats import cox_sums

        self.data, self.min_cell, self.cox_sums = data, min_cell, cox_sums
        self.described = {i: {"site": d.site, **describe(d, subgroups, KM_BIN, min_cell)} for i, d in enumerate(data)}

    def fit(self, fits: dict[str, NewtonFit]):
        while any(not f.converged for f in fits.values()):
            for name, fit in fits.items():
                if fit.converged:
                    continue
                p = len(fit.terms)
                total = [0.0, np.zeros(p), np.zeros((p, p))]
                for d in self.data:
                    sums = self.cox_sums(d, {name: fit.request()}, self.min_cell)
                    if f"cox/{name}/loglik" in sums:
                        total[0] += sums[f"cox/{name}/loglik"]
                        total[1] += np.asarray(sums[f"cox/{name}/gradient"])
                        total[2] += np.asarray(sums[f"cox/{name}/hessian"]).reshape(p, p)
                fit.update(*total)
                assert fit.iterations < 25
        return fits


def test_summed_site_gradients_and_hessians_give_lifelines_stratified_cox_fit(sites):
    coordinator = Coordinator(_data(sites))
    request = Request("treatment", COVARIATES, SUBGROUPS, KM_BIN, 10)
    fits, _ = plan_fits(request, coordinator.described)
    coordinator.fit(fits)
    pooled = _pooled(sites)
    reference = cox(pooled[["time", "event", "treatment", *COVARIATES, "site"]])
    table = fits["overall"].table()
    for term in ["treatment", *COVARIATES]:  # every adjusted term, per natural unit
        assert table[term]["coef"] == pytest.approx(reference.params_[term], abs=1e-6)
        assert table[term]["se"] == pytest.approx(reference.standard_errors_[term], abs=1e-4)
        assert table[term]["p"] == pytest.approx(reference.summary.loc[term, "p"], rel=1e-3, abs=1e-12)
        assert table[term]["hr_low"] == pytest.approx(reference.summary.loc[term, "exp(coef) lower 95%"], rel=1e-4)
    assert fits["overall"].loglik == pytest.approx(reference.log_likelihood_, abs=1e-6)
    assert fits["overall"].iterations <= 8

    # inside each mutation level, and the interaction model, the same holds
    for level in (0, 1):
        rows = pooled[pooled["mutation"] == level]
        ref = cox(rows[["time", "event", "treatment", *COVARIATES, "site"]])
        assert fits[f"mutation={level}"].table()["treatment"]["coef"] == pytest.approx(ref.params_["treatment"], abs=1e-6)
    frame = pooled[["time", "event", "treatment", *COVARIATES, "site"]].assign(
        **{"mutation=1": pooled["mutation"], "treatment:mutation=1": pooled["treatment"] * pooled["mutation"]})
    ref = cox(frame)
    full = fits["mutation:interaction"]
    for i, term in enumerate(full.terms):
        assert full.beta[i] == pytest.approx(ref.params_[term], abs=1e-6), term
    assert full.loglik == pytest.approx(ref.log_likelihood_, abs=1e-6)

    # the demo's truth: the drug works in carriers only
    carriers, others = fits["mutation=1"].table()["treatment"], fits["mutation=0"].table()["treatment"]
    assert carriers["hr_low"] <= np.exp(demo.TRUE_TREATMENT_LOG_HR[1]) <= carriers["hr_high"] and carriers["hr_high"] < 1
    assert others["hr_low"] <= 1.0 <= others["hr_high"]


def test_pooled_kaplan_meier_from_binned_counts_equals_lifelines_on_rounded_times(sites):
    coordinator = Coordinator(_data(sites))
    pooled = _pooled(sites)
    rounded = time_bins(pooled["time"].to_numpy(float), KM_BIN) * KM_BIN
    for arm in (0, 1):
        curve = kaplan_meier(coordinator.described, arm, KM_BIN, 10)
        mask = (pooled["treatment"] == arm).to_numpy()
        km = KaplanMeierFitter().fit(rounded[mask], pooled["event"][mask])
        times = np.asarray(curve["time"])
        np.testing.assert_allclose(curve["survival"], km.survival_function_at_times(times).to_numpy(), atol=1e-12)
        bands = km.confidence_interval_survival_function_.reindex(times, method="ffill")
        np.testing.assert_allclose(curve["low"], bands.iloc[:, 0].to_numpy(), atol=1e-9)
        np.testing.assert_allclose(curve["high"], bands.iloc[:, 1].to_numpy(), atol=1e-9)
        at_risk = [int((rounded[mask] >= t).sum()) if t > 0 else int(mask.sum()) for t in times]
        assert curve["at_risk"] == at_risk and min(at_risk) >= 10
        # the curve ends where fewer than min-cell remain
        assert int((rounded[mask] >= times[-1] + KM_BIN).sum()) < 10
        if curve["median"]["value"] is not None:
            assert curve["median"]["value"] == km.median_survival_time_


def test_stratified_log_rank_from_per_bin_sums_equals_statsmodels_on_the_exact_times(sites):
    from statsmodels.duration.survfunc import survdiff

    coordinator = Coordinator(_data(sites))
    result = logrank(coordinator.described)
    pooled = _pooled(sites)
    chi2, p = survdiff(pooled["time"], pooled["event"], pooled["treatment"], strata=pooled["site"])
    assert result["chi2"] == pytest.approx(chi2, rel=1e-9) and result["p"] == pytest.approx(p, rel=1e-6)
    assert result["sites"] == 5


def test_small_arms_and_levels_are_suppressed_at_the_site_and_left_out_of_the_figure(tmp_path, sites):
    small = tmp_path / "Site-06"
    small.mkdir()
    frame = demo.cohort(demo.regions(6)[5]).head(60)
    frame.loc[frame.index[6:], "treatment"] = 0  # 6 treated of 60: that arm is under min-cell here
    frame.to_csv(small / "cohort.csv", index=False)
    data = _data(sites) + [load_analysis_data(small, "Site-06", "treatment", COVARIATES, SUBGROUPS)]
    coordinator = Coordinator(data)
    own = coordinator.described[5]
    assert own["arm/1/suppressed"] == 1 and "arm/1/n" not in own and "km/1/at_risk" not in own
    assert "logrank/oe" not in own and all(k.endswith("/suppressed") for k in own if k.startswith("level/"))
    assert "km/0/at_risk" in own  # its control arm still counts in the control curve
    fits, levels = plan_fits(Request("treatment", COVARIATES, SUBGROUPS, KM_BIN, 10), coordinator.described)
    coordinator.fit(fits)
    pooled = _pooled(sites)  # the five large sites only: the small one is left out of the Cox figure
    reference = cox(pooled[["time", "event", "treatment", *COVARIATES, "site"]])
    assert fits["overall"].table()["treatment"]["coef"] == pytest.approx(reference.params_["treatment"], abs=1e-6)
    assert logrank(coordinator.described)["sites"] == 5
    assert kaplan_meier(coordinator.described, 0, KM_BIN, 10)["sites"] == 6
    assert kaplan_meier(coordinator.described, 1, KM_BIN, 10)["sites"] == 5

    # a pooled level with fewer than min-cell events in an arm is published only as "suppressed"
    strict = plan_fits(Request("treatment", COVARIATES, SUBGROUPS, KM_BIN, 150), {
        i: {"site": d.site, **describe(d, SUBGROUPS, KM_BIN, 10)} for i, d in enumerate(_data(sites))})[1]
    assert strict["mutation"][1]["suppressed"] and not strict["mutation"][0]["suppressed"]


def test_bad_columns_and_separation_give_errors_that_name_the_site_and_column(tmp_path, sites):
    with pytest.raises(SiteDataError, match=r"^site X: cohort.csv has no column 'kras' \(named as subgroup\)$"):
        load_analysis_data(sites[0], "X", "treatment", COVARIATES, ["kras"])
    with pytest.raises(SiteDataError, match=r"^site X: cohort.csv has no column 'drug' \(named as treatment\)$"):
        load_analysis_data(sites[0], "X", "drug", [], [])
    with pytest.raises(SiteDataError, match=r"^site X: treatment column 'stage' must hold 0 \(control\) or 1"):
        load_analysis_data(sites[0], "X", "stage", [], [])
    with pytest.raises(SiteDataError, match=r"^site X: subgroup column 'age' has more than 10 levels"):
        load_analysis_data(sites[0], "X", "treatment", [], ["age"])
    # separation: every treated patient survives, so the treatment's coefficient runs off to -infinity
    folder = tmp_path / "separated"
    folder.mkdir()
    frame = pd.read_csv(sites[0] / "cohort.csv")
    frame.loc[frame["treatment"] == 1, "event"] = 0
    frame.to_csv(folder / "cohort.csv", index=False)
    coordinator = Coordinator([load_analysis_data(folder, "S", "treatment", COVARIATES, [])], subgroups=[])
    fits, _ = plan_fits(Request("treatment", COVARIATES, [], KM_BIN, 10), coordinator.described)
    with pytest.raises(FitError, match=r"Cox model 'overall'.*'treatment' diverges \(separation"):
        coordinator.fit(fits)


def _analyse(step: str, **extra) -> RecordDict:
    config = {"step": step, "treatment": "treatment", "covariates": ",".join(COVARIATES), "subgroups": "mutation",
              "km-bin": KM_BIN, "min-cell": 10, **extra}
    return RecordDict({"config": ConfigRecord(config)})


def test_a_node_answers_with_sums_records_only_digests_and_sums_and_enforces_its_iteration_cap(tmp_path, sites):
    from client.app import app

    policy = tmp_path / "policy.toml"
    policy.write_text("max-analysis-iterations = 2\n")
    ctx = _context(sites[3], site="Sjælland", mode="analyse")
    ctx.node_config.update({"policy": str(policy), "ledger-dir": str(tmp_path / "ledger")})
    kind = f"{MessageType.QUERY}.analyse"
    reply = app(_message(kind, _analyse("describe")), ctx)
    assert not reply.has_error() and set(reply.content.keys()) == {"site", "metrics"}
    metrics = dict(reply.content["metrics"])
    assert metrics["arm/1/n"] >= 10 and len(metrics["km/1/at_risk"]) > 10
    fit = NewtonFit("overall", ["treatment", *COVARIATES])
    for iteration in (1, 2):
        reply = app(_message(kind, _analyse("newton", iteration=iteration,
                                            fits=json.dumps({"overall": fit.request()}))), ctx)
        assert not reply.has_error()
        assert len(reply.content["metrics"]["cox/overall/hessian"]) == 16
    refusal(app(_message(kind, _analyse("newton", iteration=3, fits=json.dumps({"overall": fit.request()}))), ctx),
            r"^site Sjælland: policy refuses more than 2 Newton iterations", rule="max-analysis-iterations")
    records = read_records(next((tmp_path / "ledger").glob("run-*.jsonl")))
    sent = [r["data"]["sent"] for r in records if r["event"] == "query-analyse"]
    assert len(sent) == 3 and all(set(s) == {"digest", "sums"} for s in sent)  # no per-bin count in the ledger
    assert records[-1]["event"] == "query-analyse-failed"

    policy.write_text('modes = ["train", "validate"]\n')
    refusal(app(_message(kind, _analyse("describe")), ctx), r"^site Sjælland: policy refuses mode 'analyse'",
            rule="modes")

