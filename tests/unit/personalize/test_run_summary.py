"""The bounded run's summary line for the models reads every snapshot the job writes."""

from personalize.run import _metrics


def test_a_snapshot_with_one_outcome_only_has_no_auc_and_says_so():
    # e.g. a short replay where no session bought: the binned AUC is undefined (None)
    line = _metrics({"propensity": {"samples": 12, "positives": 0, "roc_auc": None, "log_loss": 0.4}})
    assert line == "12 sessions scored, ROC AUC n/a (one outcome only), log loss 0.400 (progressive)"


def test_a_snapshot_with_both_outcomes_prints_its_auc():
    line = _metrics({"propensity": {"samples": 3, "positives": 1, "roc_auc": 0.75, "log_loss": 0.5}})
    assert line == "3 sessions scored, ROC AUC 0.750, log loss 0.500 (progressive)"
    assert _metrics({}) == "no sessions scored"


def test_past_the_recent_window_the_line_gives_its_figures_beside_a_constant_s():
    recent = {"samples": 5000, "positives": 200, "roc_auc": 0.71, "log_loss": 0.16, "base_rate_log_loss": 0.168}
    line = _metrics({"propensity": {"samples": 9000, "positives": 300, "roc_auc": 0.7, "log_loss": 0.2,
                                    "recent": recent}})
    assert line == ("9000 sessions scored, ROC AUC 0.700, log loss 0.200 (progressive); last 5000: ROC AUC 0.710, "
                    "log loss 0.160 (a constant at their base rate: 0.168)")
    # while the window holds every score, the line is the progressive one alone
    line = _metrics({"propensity": {"samples": 3, "positives": 1, "roc_auc": 0.75, "log_loss": 0.5,
                                    "recent": dict(recent, samples=3)}})
    assert line == "3 sessions scored, ROC AUC 0.750, log loss 0.500 (progressive)"
