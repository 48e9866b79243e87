"""Pseudo-labels and the two filter strategies, as pure functions of numpy arrays.

- `pseudo_label`: the argmax label of each pair (SPEC 2).
- `confidence_filter`: SSRM's confidence threshold (SPEC 3).
- `learning_status`: SER's learning-status filter over per-response scores (SPEC 4).
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
                    min_count=600, min_fraction=0.0, mode="sequential"):
    """SER's learning-status filter (section 3, steps 2-3) over scores p = sigmoid(r).

    Status 1 (tell good from bad): one response has p > tau_high and the other p < tau_low.
    Status 2 (separate similar answers): |p(a1) - p(a2)| > tau_delta.
    A status is met when at least max(min_count, ceil(min_fraction * N), 1) pairs qualify.
    sequential (the paper): status 1 if met, else status 2 if met, else 'converged' (the
    loop stops). union (the released code): the pairs that meet either, in one pass.
    """
    a, b = np.asarray(score_a, dtype=np.float64), np.asarray(score_b, dtype=np.float64)
    s1 = ((a > tau_high) & (b < tau_low)) | ((b > tau_high) & (a < tau_low))
    s2 = np.abs(a - b) > tau_delta
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
