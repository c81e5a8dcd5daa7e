"""Membership-inference attacks on a classifier's outputs: loss threshold, LiRA and RMIA.

Every attack turns what the target model says about a candidate example (and, for LiRA
and RMIA, what K reference models trained on known subsets say about it) into a
membership score, higher for "member"; privacy/mia_metrics.py scores the scores.

- loss (Yeom et al. 2018): the negative cross-entropy of the true label.
- LiRA (Carlini et al., "Membership Inference Attacks From First Principles", 2022): the
  target's logit-scaled confidence phi = log p_y - log(1 - p_y) is compared with its
  distribution over reference models that trained on the example (IN) and that did not
  (OUT), both Gaussian per example. Online: the likelihood ratio
  N(phi; mu_in, s_in) / N(phi; mu_out, s_out). Offline (OUT models only): the one-sided
  test Pr[Z < phi], Z ~ N(mu_out, s_out). Fixed variance: one variance per side pooled
  over all examples, for few reference models.
- RMIA (Zarifis et al., "Low-Cost High-Power Membership Inference Attacks", ICML 2024):
  the ratio LR(x) = p(y_x | x, target) / Pr(x), Pr(x) the reference models' mean
  probability, is compared pairwise with the same ratio of population examples z that
  no model trained on; the score is the fraction of z with LR(x) / LR(z) > gamma.
  Offline, Pr(x) = ((1 + a) mean_OUT + (1 - a)) / 2 approximates the IN/OUT mean from
  OUT models alone, with `a` fitted on a reference model as a stand-in target.

The research code of both papers is for other frameworks and datasets, and ML Privacy
Meter is no maintained dependency of ours, so the few lines of each are written here
from the papers.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import norm

from privacy.mia_metrics import attack_auc

ATTACKS = ("loss", "lira", "rmia")  # what --attacks accepts; lira and rmia run both modes
_EPS = 1e-30
# Fewer models than this per side and per example: LiRA pools one variance over all
# examples (Carlini et al. find per-example variances pay off only with many models).
MIN_MODELS_PER_SIDE = 16


def signals(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray]:
    """Per example: `loss` (cross-entropy), `p` (probability of the true label) and
    `phi` (LiRA's logit scaling, computed stably as z_y - logsumexp of the other logits)."""
    logits, labels = logits.double(), labels.long()
    loss = F.cross_entropy(logits, labels, reduction="none")
    true = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf")).logsumexp(1)
    return {"loss": loss.numpy(), "p": torch.exp(-loss).numpy(), "phi": (true - others).numpy()}


def loss_scores(target_loss: np.ndarray) -> np.ndarray:
    return -np.asarray(target_loss, dtype=np.float64)


def _side_stats(ref: np.ndarray, mask: np.ndarray, fixed_variance: bool
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per-example mean and std of `ref` [K, N] over the models where `mask` holds."""
    count = mask.sum(0)
    if (count == 0).any():
        raise ValueError("an example has no reference model on this side; train more "
                         "reference models (an even number, trained on paired halves)")
    mean = np.where(mask, ref, 0).sum(0) / count
    dev2 = np.where(mask, (ref - mean) ** 2, 0)
    if fixed_variance or (count < MIN_MODELS_PER_SIDE).any():
        std = np.full_like(mean, np.sqrt(dev2.sum() / max(mask.sum() - mask.shape[1], 1)))
    else:
        std = np.sqrt(dev2.sum(0) / (count - 1))
    return mean, std + 1e-6


def lira_scores(target_phi: np.ndarray, ref_phi: np.ndarray, ref_in: np.ndarray,
                online: bool = True, fixed_variance: bool = False) -> np.ndarray:
    """LiRA on `target_phi` [N] with reference confidences `ref_phi` [K, N], `ref_in`
    [K, N] telling which reference trained on which example. With fewer than
    MIN_MODELS_PER_SIDE models per side the variance is pooled (fixed variance)."""
    ref_phi, ref_in = np.asarray(ref_phi, np.float64), np.asarray(ref_in, bool)
    mu_out, s_out = _side_stats(ref_phi, ~ref_in, fixed_variance)
    if not online:
        return norm.logcdf(target_phi, mu_out, s_out)
    mu_in, s_in = _side_stats(ref_phi, ref_in, fixed_variance)
    return norm.logpdf(target_phi, mu_in, s_in) - norm.logpdf(target_phi, mu_out, s_out)


def rmia_scores(target_p: np.ndarray, ref_p: np.ndarray, ref_in: np.ndarray,
                population_target_p: np.ndarray, population_ref_p: np.ndarray,
                offline_a: float | None = None, gamma: float = 1.0) -> np.ndarray:
    """RMIA of candidates (target probability `target_p` [N], references `ref_p` [K, N],
    `ref_in` [K, N]) against population examples z (`population_target_p` [Z] or [N, Z]
    when each candidate has its own target model, `population_ref_p` [K, Z]).
    `offline_a` None: online (Pr(x) over all references); else offline with that `a`."""
    ref_p, ref_in = np.asarray(ref_p, np.float64), np.asarray(ref_in, bool)
    if offline_a is None:
        pr_x = ref_p.mean(0)
    else:
        out = ~ref_in
        pr_x = ((1 + offline_a) * np.where(out, ref_p, 0).sum(0) / out.sum(0)
                + (1 - offline_a)) / 2
    pr_z = np.asarray(population_ref_p, np.float64).mean(0)  # no model trained on z
    ratio_x = np.asarray(target_p, np.float64) / (pr_x + _EPS)
    ratio_z = np.asarray(population_target_p, np.float64) / (pr_z + _EPS)
    if ratio_z.ndim == 1:  # one target model: sort once and count by bisection
        ratio_z = np.sort(ratio_z)
        return np.searchsorted(ratio_z, ratio_x / gamma, side="left") / ratio_z.size
    return (ratio_x[:, None] / (ratio_z + _EPS) > gamma).mean(1)


def fit_rmia_a(ref_p: np.ndarray, ref_in: np.ndarray, population_ref_p: np.ndarray,
               grid: np.ndarray = np.linspace(0, 1, 11)) -> float:
    """RMIA's offline `a`: the value in `grid` whose offline attack, with reference model 0
    as the target (its members known) and the others as references, has the best AUC."""
    ref_p, ref_in = np.asarray(ref_p, np.float64), np.asarray(ref_in, bool)
    if len(ref_p) < 4:
        raise ValueError(f"fitting RMIA's offline a needs at least 4 reference models "
                         f"(got {len(ref_p)}); pass --rmia-a or train more")
    pseudo, others, others_in = ref_p[0], ref_p[1:], ref_in[1:]
    usable = (~others_in).any(0)  # candidates with an OUT model among the others
    aucs = [attack_auc(rmia_scores(pseudo[usable], others[:, usable], others_in[:, usable],
                                   population_ref_p[0], population_ref_p[1:], a),
                       ref_in[0, usable]) for a in grid]
    return float(grid[int(np.argmax(aucs))])
