"""Evaluation metrics (SPEC 5): accuracy with each model kind's tie rule, RewardBench
sections, calibration (ECE, Brier, NLL, reliability table, histogram), and the accuracy of
pseudo-labels against gold labels (gold_report). numpy only (and filters.confidence)."""
import numpy as np

from selfrm.filters import confidence

# RewardBench's example counts: a section is the mean of its subsets' accuracies weighted by these
SECTIONS = {
    "chat": {"alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28,
             "mt-bench-med": 40},
    "chat_hard": {"mt-bench-hard": 37, "llmbar-natural": 100, "llmbar-adver-neighbor": 134,
                  "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46},
    "safety": {"refusals-dangerous": 100, "refusals-offensive": 100, "xstest-should-refuse": 154,
               "xstest-should-respond": 250, "donotanswer": 136},
    # math-prm has 447 real examples, weighted up so that math counts as much as all of code
    "reasoning": {"math-prm": 984, "hep-cpp": 164, "hep-go": 164, "hep-java": 164, "hep-js": 164,
                  "hep-python": 164, "hep-rust": 164},
}
PRIOR_SETS = ("anthropic_helpful", "anthropic_hhh", "shp", "summarize")
LEADERBOARD_WEIGHTS = {"chat": 2, "chat_hard": 2, "safety": 2, "reasoning": 2, "prior_sets": 1}


def pair_correct(scores, model_type):
    """Per-pair correctness from score_encoded's output with a = chosen, b = rejected.
    pm: 1 when P(chosen) > 0.5, 0.5 for an exact tie, else 0 (SPEC 1a).
    rm: 1 only when r_chosen > r_rejected; a tie is wrong (SPEC 5). Compared on the rewards,
    since sigmoid of a tiny difference rounds to 0.5."""
    if model_type == "rm":
        return (np.asarray(scores["reward_a"]) > np.asarray(scores["reward_b"])).astype(np.float64)
    prob = np.asarray(scores["prob_a"], dtype=np.float64)
    return np.where(prob > 0.5, 1.0, np.where(prob == 0.5, 0.5, 0.0))


def by_subset(correct, subsets):
    """{subset: {"accuracy", "n"}} for the subsets present."""
    out = {}
    for name in sorted(set(subsets)):
        mask = np.array([s == name for s in subsets])
        out[name] = {"accuracy": float(np.mean(correct[mask])), "n": int(mask.sum())}
    return out


def rewardbench_sections(subset_accuracy):
    """Section scores from {subset: accuracy}, each over the section's subsets present,
    weighted by RewardBench's example counts; the plain mean of the four sections (as the
    SSRM paper reports it) when all four are present; and the leaderboard score (weights
    2, 2, 2, 2, 1 with the prior sets' mean) when the prior sets are present too."""
    sections = {}
    for section, counts in SECTIONS.items():
        present = [s for s in counts if s in subset_accuracy]
        if present:
            total = sum(counts[s] for s in present)
            sections[section] = sum(subset_accuracy[s] * counts[s] for s in present) / total
    out = {"sections": sections}
    if len(sections) == len(SECTIONS):
        out["mean_of_sections"] = float(np.mean(list(sections.values())))
        prior = [subset_accuracy[s] for s in PRIOR_SETS if s in subset_accuracy]
        if prior:
            scores = {**sections, "prior_sets": float(np.mean(prior))}
            out["prior_sets"] = scores["prior_sets"]
            out["leaderboard_score"] = (sum(LEADERBOARD_WEIGHTS[k] * scores[k] for k in LEADERBOARD_WEIGHTS)
                                        / sum(LEADERBOARD_WEIGHTS.values()))
    return out


def bin_index(x, n_bins):
    """The bin [k/n, (k+1)/n) of each value (1.0 in the last), the one rule of the reliability
    table and the histogram. Rounded first: 0.7 * 10 is 7.000000000000001 and np.linspace's
    edge 0.7000000000000001, so without it 0.3, 0.6 and 0.7 land one bin apart between a
    product rule and np.histogram."""
    return np.clip(np.floor(np.round(np.asarray(x, dtype=np.float64) * n_bins, 9)).astype(int), 0, n_bins - 1)


def calibration(prob_chosen, n_bins=10):
    """Calibration of P = the model's probability that the chosen response is preferred.

    ECE: confidence max(P, 1-P) in n_bins equal-width bins of [0, 1] (with two classes only
    the upper half can fill); per bin, accuracy = how often the more likely side is the
    chosen one (an exact tie counts 0.5); ECE = sum over bins of n_b / N * |acc_b - conf_b|.
    Brier = mean (1 - P)^2. NLL = mean -log P. Histogram: counts of P in n_bins bins."""
    p = np.asarray(prob_chosen, dtype=np.float64)
    conf = np.maximum(p, 1 - p)
    right = np.where(p > 0.5, 1.0, np.where(p == 0.5, 0.5, 0.0))
    edges = np.linspace(0, 1, n_bins + 1)
    which = bin_index(conf, n_bins)
    table, ece = [], 0.0
    for b in range(n_bins):
        inside = which == b
        if inside.any():
            acc, mean_conf = float(right[inside].mean()), float(conf[inside].mean())
            ece += inside.sum() / len(p) * abs(acc - mean_conf)
            table.append({"bin": f"{edges[b]:.1f}-{edges[b + 1]:.1f}", "count": int(inside.sum()),
                          "confidence": mean_conf, "accuracy": acc})
    histogram = np.bincount(bin_index(p, n_bins), minlength=n_bins)
    return {"ece": float(ece), "brier": float(np.mean((1 - p) ** 2)),
            "nll": float(np.mean(-np.log(np.clip(p, 1e-12, 1.0)))), "reliability": table,
            "histogram": {"edges": [round(float(e), 2) for e in edges], "counts": histogram.tolist()}}


def evaluate_scores(scores, model_type, subsets):
    """All of evaluate.py's numbers from one scoring pass (a = chosen, b = rejected)."""
    correct = pair_correct(scores, model_type)
    subset_metrics = by_subset(correct, subsets)
    out = {"accuracy": float(correct.mean()), "n": int(len(correct)), "subsets": subset_metrics}
    out.update(rewardbench_sections({s: m["accuracy"] for s, m in subset_metrics.items()}))
    out["calibration"] = calibration(scores["prob_a"])
    return out, correct


def accuracy(scores, model_type):
    return float(pair_correct(scores, model_type).mean())


def gold_report(prob_a, labels, gold, keep):
    """Pseudo-label accuracy against gold labels, where rows carry them: overall, among kept
    rows, and per confidence bin (0.5-0.6 ... 0.9-1.0)."""
    has = np.array([g is not None for g in gold])
    if not has.any():
        return {}
    right = labels == gold
    index = bin_index(confidence(prob_a), 10)  # the calibration table's bins: 0.7 + 0.1 falls in 0.8-0.9, as 0.8 does
    bins = {}
    for k in range(5, 10):
        inside = has & (index == k)
        bins[f"{k / 10:.1f}-{(k + 1) / 10:.1f}"] = {"n": int(inside.sum()),
                                                   "accuracy": float(right[inside].mean()) if inside.any() else None}
    kept = has & keep
    return {"gold_rows": int(has.sum()), "pseudo_label_accuracy": float(right[has].mean()),
            "pseudo_label_accuracy_kept": float(right[kept].mean()) if kept.any() else None,
            "accuracy_by_confidence": bins}
