"""How membership-inference attacks are scored: ROC AUC, TPR at a low FPR, and an
empirical lower bound on epsilon with Clopper-Pearson intervals.

Scores are higher for "member". `tpr_at_fpr` is the TPR at the last ROC point whose
FPR does not exceed the target (as ML Privacy Meter reports it), and refuses a target
FPR that the non-members cannot resolve: with N non-members the smallest non-zero FPR
is 1/N, so a TPR at 0.1% FPR needs well over 1,000 of them (`min_negatives_per_fpr`
times 1/FPR).

The empirical epsilon follows the hypothesis-testing view of DP (Kairouz et al. 2015):
for any threshold, an (eps, delta)-DP mechanism has FPR + e^eps * FNR >= 1 - delta and
FNR + e^eps * FPR >= 1 - delta. With upper confidence bounds FPR+ and FNR+ (one-sided
Clopper-Pearson), eps >= log((1 - delta - FNR+) / FPR+) and
eps >= log((1 - delta - FPR+) / FNR+). The bound reported is the largest over the ROC's
m thresholds; so that it holds with probability `confidence` although it was picked
among 2m rates, each rate's bound is taken at 1 - (1 - confidence) / (2m) (Bonferroni). Written here because scikit-learn has the ROC
but no such bound, and the libraries that have one are not maintained dependencies.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import beta
from sklearn.metrics import roc_auc_score, roc_curve


class TooFewNonMembers(ValueError):
    """The requested FPR is below what the non-members can measure."""


def _split(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, is_member = np.asarray(scores, dtype=np.float64), np.asarray(is_member, dtype=bool)
    if scores.shape != is_member.shape or is_member.all() or not is_member.any():
        raise ValueError(f"need scores and member flags of one shape with both members and "
                         f"non-members; got {scores.shape} scores, {int(is_member.sum())} "
                         f"members of {is_member.size}")
    return scores, is_member


def attack_auc(scores, is_member) -> float:
    scores, is_member = _split(scores, is_member)
    return float(roc_auc_score(is_member, scores))


def tpr_at_fpr(scores, is_member, fpr: float, min_negatives_per_fpr: int = 10) -> float:
    """TPR at the largest ROC FPR <= `fpr`."""
    scores, is_member = _split(scores, is_member)
    negatives = int((~is_member).sum())
    needed = math.ceil(min_negatives_per_fpr / fpr)
    if negatives < needed:
        raise TooFewNonMembers(
            f"TPR at FPR {fpr:g} needs at least {needed} non-members (got {negatives}); "
            "hold out more non-members or report a larger FPR")
    fprs, tprs, _ = roc_curve(is_member, scores)
    return float(tprs[np.searchsorted(fprs, fpr, side="right") - 1])


def clopper_pearson_upper(k: np.ndarray, n: int, confidence: float) -> np.ndarray:
    """One-sided upper bound of a binomial rate from k successes in n trials."""
    k = np.asarray(k, dtype=np.float64)
    upper = beta.ppf(confidence, k + 1, n - k)
    return np.where(k >= n, 1.0, upper)


def empirical_epsilon(scores, is_member, delta: float = 0.0, confidence: float = 0.95) -> float:
    """A lower bound on epsilon that holds with probability `confidence` (see above)."""
    scores, is_member = _split(scores, is_member)
    positives, negatives = int(is_member.sum()), int((~is_member).sum())
    fprs, tprs, _ = roc_curve(is_member, scores)
    level = 1 - (1 - confidence) / (2 * len(fprs))  # every rate's bound at once
    fp_upper = clopper_pearson_upper(np.round(fprs * negatives), negatives, level)
    fn_upper = clopper_pearson_upper(np.round((1 - tprs) * positives), positives, level)
    with np.errstate(divide="ignore", invalid="ignore"):
        bounds = np.concatenate([np.log((1 - delta - fn_upper) / fp_upper),
                                 np.log((1 - delta - fp_upper) / fn_upper)])
    bounds = bounds[np.isfinite(bounds)]
    return float(max(0.0, bounds.max())) if bounds.size else 0.0
