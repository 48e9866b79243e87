"""The two training losses, as pure functions of tensors. Each returns one loss per pair
(no reduction): the training loop sums them and divides by the number of pairs in the
global batch, so gradient accumulation and DDP average over pairs exactly."""
import torch.nn.functional as F


def srm_loss(label_logits, labels, other_labels=None, probs=None):
    """SRM (SSRM section 2.1): l = -log pi(y | T(x, a1, a2)), the cross-entropy of the label
    token over the whole vocabulary, at the one label position.

    label_logits: (B, V) next-token logits at the label position; labels: (B,) token ids of
    `A` or `B`. Returns (B,) losses, computed in fp32.
    Soft labels (probs (B,), with other_labels the other token): target mass p on the label
    token and 1 - p on the other one, l = -[p log pi(y) + (1 - p) log pi(y')]; p = 1 (a gold
    pair) gives the hard loss exactly.
    """
    logits = label_logits.float()
    loss = F.cross_entropy(logits, labels, reduction="none")
    if probs is None:
        return loss
    return probs * loss + (1 - probs) * F.cross_entropy(logits, other_labels, reduction="none")


def pairwise_loss(chosen_rewards, rejected_rewards, margins=None, center_coefficient=0.0, probs=None):
    """Pairwise (Bradley-Terry) loss (SER section 3, step 3):
    l = -log sigmoid(r_chosen - r_rejected - m)  [+ c * (r_chosen + r_rejected)^2].

    The optional second term is TRL's `center_rewards_coefficient` (Eisenstein et al., 2023):
    averaged over the batch it is c * mean((r_c + r_r)^2), which keeps the rewards centred
    on zero (the pairwise term alone fixes only their differences).
    Soft labels (probs (B,): p, the probability that the labeled-chosen response is better):
    l = -[p log sigmoid(r_c - r_r - m) + (1 - p) log sigmoid(r_r - r_c - m)]: the margin asks
    the same lead of whichever response is better; p = 1 (a gold pair) gives the hard loss
    exactly.
    chosen_rewards, rejected_rewards: (B,); margins: (B,) or None (m = 0). Returns (B,).
    """
    chosen, rejected = chosen_rewards.float(), rejected_rewards.float()
    diff = chosen - rejected
    if margins is not None:
        diff = diff - margins
    loss = -F.logsigmoid(diff)
    if probs is not None:
        reverse = rejected - chosen - margins if margins is not None else rejected - chosen
        loss = probs * loss + (1 - probs) * -F.logsigmoid(reverse)
    if center_coefficient:
        loss = loss + center_coefficient * (chosen + rejected) ** 2
    return loss
