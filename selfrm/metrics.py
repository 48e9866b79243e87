"""Evaluation metrics over preference probabilities: accuracy with each kind's tie rule."""
import numpy as np


def pair_correct(prob_chosen, model_type):
    """Per-pair correctness. pm: 1 when P(chosen) > 0.5, 0.5 for a tie, else 0 (SPEC 1a).
    rm: 1 only when r_chosen > r_rejected, i.e. P > 0.5; a tie is wrong (SPEC 5)."""
    prob_chosen = np.asarray(prob_chosen, dtype=np.float64)
    correct = (prob_chosen > 0.5).astype(np.float64)
    if model_type == "pm":
        correct[prob_chosen == 0.5] = 0.5
    return correct


def accuracy(prob_chosen, model_type):
    return float(pair_correct(prob_chosen, model_type).mean())
