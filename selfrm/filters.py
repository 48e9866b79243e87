"""Pseudo-labels, the two filters and the selection rules, as pure functions of numbers.

- `pseudo_label`: the argmax label of each pair (SPEC 2).
- `confidence_filter`: SSRM's confidence threshold (SPEC 3).
- `learning_status`: SER's learning-status filter over per-response scores (SPEC 4).
- `select`: one labeling pass of a round, from a pool's scores to the pairs kept.

Bradley-Terry lives here and in scoring.py: P(a1 > a2) = sigmoid(r1 - r2) for a scalar model,
SER's scores p = sigmoid(r), so --threshold=0.8 and the taus mean what the papers mean only
for a model trained with the pairwise loss (losses.pairwise_loss). A fork that trains another
loss (a hinge, say) changes what these numbers are: it maps its scores to probabilities in
scoring.py and `pair_logits`, or sets new thresholds.

Rules beyond the two papers, each off by default (README, "Selection rules beyond the papers"):
- `consistent_filter`: a pairwise model's verdict counts when both A/B orders agree.
- `fit_temperature` / `calibrated`: one temperature T fitted on held-out labeled pairs.
- `stable_labels`: whether a pseudo-label equals the one of the previous round.
- `longer_share`: how often a preferred response is the longer one (a report, not a filter).
"""
import math
from dataclasses import dataclass

import numpy as np


def pseudo_label(prob_a):
    """'a' where P(a1 > a2) > 0.5, else 'b' (a tie goes to a2, as the argmax rule states it)."""
    return np.where(np.asarray(prob_a) > 0.5, "a", "b")


def confidence(prob_a):
    prob_a = np.asarray(prob_a, dtype=np.float64)
    return np.maximum(prob_a, 1.0 - prob_a)


def confidence_filter(prob_a, threshold=0.8):
    """SSRM (Algorithm 1): keep a pair when its confidence max(P, 1 - P) >= threshold."""
    return confidence(prob_a) >= threshold


def order_disagreement(prob_a_orders):
    """(N,) bool: the two orders of a pm pair pick different responses (position bias).
    prob_a_orders: (N, 2), P(a1 > a2) with a1 in slot A and with a1 in slot B."""
    orders = np.asarray(prob_a_orders, dtype=np.float64).reshape(-1, 2)
    return pseudo_label(orders[:, 0]) != pseudo_label(orders[:, 1])


def consistent_filter(prob_a_orders, prob_a, threshold=0.8):
    """Order consistency (pm): keep a pair when both orders pick the same response and the
    order-averaged confidence max(P, 1 - P) >= threshold (P = prob_a, calibrated or not)."""
    return ~order_disagreement(prob_a_orders) & confidence_filter(prob_a, threshold)


def pair_logits(scores):
    """z with P(a1 > a2) = sigmoid(z): rm r1 - r2; pm the logit of the order-averaged P."""
    return scores["reward_a"] - scores["reward_b"] if "reward_a" in scores else logit(scores["prob_a"])


def logit(prob):
    """log(P / (1 - P)), P clipped to [1e-12, 1 - 1e-12] so that a saturated P stays finite."""
    p = np.clip(np.asarray(prob, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def calibrated(logits, temperature=1.0):
    """P_T = sigmoid(z / T) of pair logits z (rm: r1 - r2; pm: logit of the order-averaged P)."""
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64) / temperature))


def temperature_nll(logits, temperature):
    """Mean -log P_T of pairs whose first response is the better one: softplus(-z / T)."""
    return float(np.mean(np.logaddexp(0.0, -np.asarray(logits, dtype=np.float64) / temperature)))


T_BOUNDS = (0.05, 20.0)  # the range T is fitted in


def fit_temperature(logits, low=T_BOUNDS[0], high=T_BOUNDS[1], iterations=200):
    """The T in [low, high] that minimises temperature_nll on pairs whose first response is
    the better one (z = their logits). The NLL is convex in 1/T, so a golden-section search
    over log(1/T) finds the minimum; T = 1 is returned where it is no worse (no pairs, all
    z = 0, or a minimum at T = 1), so the fitted T never raises the NLL it was fitted on.
    The bounds matter when every held-out pair is ranked right: the NLL then falls without
    end as T -> 0, and T stops at `low` (sigmoid(z / 0.05): z = 0.1 gives 0.88, not 1.0)."""
    z = np.asarray(logits, dtype=np.float64)
    if not np.isfinite(z).all():
        raise ValueError(f"temperature fit: {int((~np.isfinite(z)).sum())} of {z.size} pair logits are not finite")
    if z.size == 0 or not np.any(z):
        return 1.0
    nll = lambda u: temperature_nll(z, math.exp(-u))  # u = log(1/T)
    a, b = -math.log(high), -math.log(low)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(iterations):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(d)
    t = math.exp(-(a + b) / 2)
    t = next((edge for edge in (low, high) if abs(math.log(t / edge)) < 1e-6), t)  # at a bound: the bound itself
    return t if temperature_nll(z, t) < temperature_nll(z, 1.0) else 1.0


def stable_labels(labels, previous):
    """Per pair: True where its pseudo-label equals `previous` (the label it got in the last
    round), False where it flipped, None where it has no previous label (previous[i] None)."""
    return [None if p is None else bool(l == p) for l, p in zip(labels, previous)]


def longer_share(preferred_tokens, other_tokens):
    """The share of pairs whose preferred response is the longer one (in tokens), among the
    pairs whose two responses differ in length; None when no pair does."""
    a, b = np.asarray(preferred_tokens), np.asarray(other_tokens)
    differ = a != b
    return float((a[differ] > b[differ]).mean()) if differ.any() else None


@dataclass
class StatusResult:
    keep: np.ndarray  # (N,) bool: the pairs selected this loop
    status: np.ndarray  # (N,) int: 1 or 2 for a selected pair (the status it met), else 0
    met: str  # 'status1', 'status2', 'union', or 'converged'
    status1_count: int  # pairs that qualify for status 1
    status2_count: int  # pairs that qualify for status 2
    needed: int  # qualifying pairs a status needs to be met


def status_needed(pool_size, min_count, min_fraction):
    """Qualifying pairs a status needs: max(min_count, ceil(min_fraction * N), 1) (an empty
    selection is never 'met')."""
    return max(min_count, math.ceil(min_fraction * pool_size), 1)


def learning_status(score_a, score_b, tau_high=0.55, tau_low=0.45, tau_delta=0.3,
                    min_count=600, min_fraction=0.0, mode="sequential", eligible=None):
    """SER's learning-status filter (section 3, steps 2-3) over scores p = sigmoid(r).

    Status 1 (tell good from bad): one response has p > tau_high and the other p < tau_low.
    Status 2 (separate similar answers): |p(a1) - p(a2)| > tau_delta.
    A status is met when at least max(min_count, ceil(min_fraction * N), 1) pairs qualify.
    sequential (the paper): status 1 if met, else status 2 if met, else 'converged' (the
    loop stops). union (the released code): the pairs that meet either, in one pass.
    eligible: (N,) bool, the pairs that may qualify at all (--keep_stable: those whose label
    did not flip); a status is then met only by enough eligible pairs.
    """
    a, b = np.asarray(score_a, dtype=np.float64), np.asarray(score_b, dtype=np.float64)
    s1 = ((a > tau_high) & (b < tau_low)) | ((b > tau_high) & (a < tau_low))
    s2 = np.abs(a - b) > tau_delta
    if eligible is not None:
        s1, s2 = s1 & eligible, s2 & eligible
    needed = status_needed(len(a), min_count, min_fraction)
    if mode == "union":
        keep = s1 | s2
        met = "union" if keep.sum() >= needed else "converged"
    elif s1.sum() >= needed:
        keep, met = s1, "status1"
    elif s2.sum() >= needed:
        keep, met = s2, "status2"
    else:
        keep, met = np.zeros(len(a), dtype=bool), "converged"
    if met == "converged":
        keep = np.zeros(len(a), dtype=bool)
    status = np.where(keep & s1 & (met != "status2"), 1, np.where(keep, 2, 0))
    return StatusResult(keep, status, met, int(s1.sum()), int(s2.sum()), needed)


@dataclass
class Selection:
    prob_a: np.ndarray  # (N,) the P(a1 > a2) that labeled and filtered: P_T with a temperature, else as scored
    labels: np.ndarray  # (N,) 'a' or 'b': the pseudo-label (or the gold one, --label_source=gold)
    keep: np.ndarray  # (N,) bool: the pairs the filter kept
    status: np.ndarray  # (N,) int: SER's status of a kept pair (1 or 2, else 0); None for other filters
    stable: list  # per pair: its label equals the previous round's (True/False; None: none); None without previous
    summary: dict  # the counts for the round's summary: threshold or status counts, kept, flips


def select(cfg, scores, temperature=1.0, previous=None, gold=None):
    """One labeling pass (SPEC 2-4) from a pool's scores (scoring.score_encoded's arrays):
    label with P_T = sigmoid(z / T) (T = 1: the scores as they are; SER's per-response scores
    become sigmoid(r / T)), then keep what cfg.filter keeps. previous: per pair the label of
    the last round (None where it had none); --keep_stable then keeps only unflipped pairs.
    gold: per pair 'a', 'b' or None, the labels with --label_source=gold."""
    prob_a = scores["prob_a"] if temperature == 1.0 else calibrated(pair_logits(scores), temperature)
    labels = np.asarray(gold).astype(str) if cfg.label_source == "gold" else pseudo_label(prob_a)
    summary, orders, n = {}, scores.get("prob_a_orders"), len(prob_a)
    if orders is not None:  # the pm's position bias: how often the two orders pick different responses
        summary["order_disagreement"] = float(order_disagreement(orders).mean()) if n else 0.0
    stable = None if previous is None else stable_labels(labels, previous)
    allowed = None  # --keep_stable: the pairs whose label did not flip
    if stable is not None:
        summary["flipped"] = sum(s is False for s in stable) if any(p is not None for p in previous) else None
        if cfg.keep_stable:
            allowed = np.array([s is not False for s in stable], dtype=bool)
    status = None
    if cfg.filter in ("confidence", "consistent"):
        keep = (confidence_filter(prob_a, cfg.threshold) if cfg.filter == "confidence"
                else consistent_filter(orders, prob_a, cfg.threshold))
        summary["threshold"] = cfg.threshold
    elif cfg.filter == "status":
        result = learning_status(calibrated(scores["reward_a"], temperature), calibrated(scores["reward_b"], temperature),
                                 cfg.tau_high, cfg.tau_low, cfg.tau_delta, cfg.status_min_count,
                                 cfg.status_min_fraction, cfg.status_mode, allowed)
        keep, status = result.keep, result.status
        summary.update(status_met=result.met, status1_count=result.status1_count,
                       status2_count=result.status2_count, status_needed=result.needed)
    else:
        keep = np.ones(n, dtype=bool)
    if allowed is not None:
        keep = keep & allowed
    summary.update(kept=int(keep.sum()), kept_share=float(keep.mean()) if n else 0.0)
    return Selection(prob_a, labels, keep, status, stable, summary)
