"""Preference probabilities of pairs, batched by length, sharded across ranks; and with a
run's settings: eval pairs scored (evaluate.py's score_pairs), a pool labeled (relabel:
label.py's, and each round's through steps.py).

pm (SPEC 1a): both orders of a pair go through the same forward batch; from each, the
logits of the `A` and `B` tokens at the label position, softmaxed over those two, and
P(a1 > a2) = (p_A(a1, a2) + p_B(a2, a1)) / 2. The two terms are kept as `prob_a_orders`:
they disagree (one above 0.5, one not) where the model's verdict follows the slot, not the
response (position bias).
rm (SPEC 1b): both responses in the same batch; P(a1 > a2) = sigmoid(r1 - r2), and each
response's score p = sigmoid(r).
With share_prefix the two sequences of a pair (the two orders; the two responses) are one
row, their common prefix computed once (selfrm/sharing.py): the same numbers, fewer tokens.
"""
import math
import time

import numpy as np
import torch
from tqdm import tqdm

from selfrm import dist
from selfrm.checks import check_filter, check_gold
from selfrm.encoding import Encoder
from selfrm.filters import calibrated, confidence, longer_share, select
from selfrm.formats import chosen_rejected
from selfrm.fsdp import is_sharded
from selfrm.metrics import accuracy, gold_report
from selfrm.modeling import inner
from selfrm.sharing import last_non_pad, last_token, pack_pairs, pad_right, resolve_share_prefix, shared_length
from selfrm.trainer import autocast_dtype


@torch.inference_mode()
def score_encoded(model, encoded, pad_id, label_ids, world, batch_size=32, amp_dtype=None, desc="score",
                  share_prefix=False):
    """encoded: per pair the two id lists of Encoder.encode_score; label_ids: the ids of `A`
    and `B` for a pm, None for an rm. Returns a dict of numpy
    arrays in pair order: prob_a; for pm prob_a_orders (N, 2), P(a1 > a2) with a1 in slot A
    and with a1 in slot B; for rm reward_a, reward_b. Each rank scores its strided shard;
    every rank gets the merged result. share_prefix: each pair's two sequences in one row,
    their common prefix computed once (selfrm/sharing.py)."""
    model = inner(model).eval()
    device = world.device
    shard = list(range(world.rank, len(encoded), world.world_size))
    # longest first: batches of similar length, and an out-of-memory shows on the first batch
    length = (lambda a, b: len(a) + len(b) - shared_length(a, b)) if share_prefix else (lambda a, b: max(len(a), len(b)))
    order = sorted(shard, key=lambda i: -length(*encoded[i]))
    token_ids = torch.tensor([label_ids["A"], label_ids["B"]], device=device) if label_ids else None
    # under FSDP each forward gathers weights from every rank, so every rank runs as many forwards:
    # agreed on here, before any (the agreement is a collective too)
    # and every rank checks for preemption at the same iterations, so all stop together
    batches = math.ceil(len(order) / batch_size)
    iterations = dist.all_reduce_max(batches, world)
    idle_forwards = iterations - batches if is_sharded(model) else 0
    results = {}
    bar = tqdm(total=len(shard), desc=desc, unit="pair", disable=not world.master, leave=False, dynamic_ncols=True)
    with bar:  # closed also when a preemption signal stops the loop
        start = time.time()
        for b in range(0, len(order), batch_size):
            dist.stop_if_preempted(world, f"scoring ({desc})")
            idx = order[b:b + batch_size]
            batch = pair_batch([encoded[i] for i in idx], pad_id, token_ids is not None, share_prefix, device)
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else torch.autocast(device.type, enabled=False):
                if token_ids is not None:
                    orders = pm_order_probs(model, batch, token_ids)  # P(a1 > a2) with a1 in slot A; in slot B
                    values = torch.stack([(orders[:, 0] + orders[:, 1]) / 2, orders[:, 0], orders[:, 1]], 1)
                else:
                    rewards = rm_rewards(model, batch)
                    values = torch.stack([torch.sigmoid(rewards[:, 0] - rewards[:, 1]), rewards[:, 0], rewards[:, 1]], 1)
            for i, v in zip(idx, values.cpu().tolist()):
                results[i] = v
            bar.update(len(idx))
            bar.set_postfix(pairs_per_s=f"{(b + len(idx)) / (time.time() - start):.1f}")
    for _ in range(iterations - batches):
        dist.stop_if_preempted(world, f"scoring ({desc})")
    idle = torch.full((2, 1), pad_id, dtype=torch.long, device=device)
    for _ in range(idle_forwards):
        if token_ids is not None:
            model(idle, torch.ones_like(idle), torch.zeros(2, dtype=torch.long, device=device), token_ids=token_ids)
        else:
            model(idle, torch.ones_like(idle))
    merged = np.array(dist.gather_shards([results[i] for i in shard], world), dtype=np.float64).reshape(len(encoded), 3)
    if token_ids is not None:
        return {"prob_a": merged[:, 0], "prob_a_orders": merged[:, 1:]}
    return {"prob_a": merged[:, 0], "reward_a": merged[:, 1], "reward_b": merged[:, 2]}


def pair_batch(pairs, pad_id, pm, share_prefix, device):
    """The forward inputs of a batch of pairs, on the device: the 2B sequences padded (pair k
    -> rows 2k and 2k+1), or one row per pair in the shared-prefix layout, read at each
    sequence's last token (pm: the label position) or last non-pad token (rm: where a
    sequence classifier reads its score)."""
    if share_prefix:
        batch = pack_pairs(pairs, pad_id, last_token if pm else last_non_pad)
    else:
        input_ids, attention_mask = pad_right([s for pair in pairs for s in pair], pad_id)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def pm_order_probs(model, batch, token_ids):
    """(B, 2): p_A of the order (a1, a2) and p_B of the order (a2, a1), each softmaxed over the
    logits of `A` and `B` at the label position; their mean is P(a1 > a2)."""
    if "segment_ids" in batch:
        logits = model(batch["input_ids"], None, batch["read_positions"], token_ids=token_ids,
                       segment_ids=batch["segment_ids"], position_ids=batch["position_ids"])
    else:
        mask = batch["attention_mask"]
        logits = model(batch["input_ids"], mask, mask.sum(1) - 1, token_ids=token_ids)
    probs = logits.float().softmax(-1)  # (2B, 2): p_A, p_B of each order
    return torch.stack([probs[0::2, 0], probs[1::2, 1]], 1)


def rm_rewards(model, batch):
    """(B, 2): the rewards of each pair's two responses."""
    if "segment_ids" in batch:
        return model(batch["input_ids"], segment_ids=batch["segment_ids"], position_ids=batch["position_ids"],
                     read_positions=batch["read_positions"]).float()
    rewards = model(batch["input_ids"], batch["attention_mask"]).float()
    return torch.stack([rewards[0::2], rewards[1::2]], 1)


def report_cuts(encoder, n, what, cfg):
    """Say how many pairs were cut or left out; returns the counts for the manifest."""
    counts = {"pairs": n, "truncated": encoder.truncated, "dropped": encoder.dropped}
    if encoder.truncated or encoder.dropped:
        dist.print0(f"{what}: {encoder.truncated} of {n} truncated to max_length={cfg.max_length}"
                    + (f", {encoder.dropped} dropped (--overlong=drop)" if encoder.dropped else ""))
    return counts


# ----------------------------------------------------------------------------- pairs and pools, with a run's settings

def encode_for_scoring(cfg, tokenizer, pairs, what, counts=None):
    """Scoring inputs (Encoder.encode_score) of (prompt, first, second, where) tuples and the
    label token ids (None for rm): the pair `(ids, label_ids)` that `score` takes. Tokenize
    once, score every round. Scoring truncates every over-long pair (none is dropped);
    `counts` receives the cut counts."""
    encoder = Encoder(tokenizer, cfg.model_type, cfg.max_length)
    ids = encoder.encode_score(*(list(column) for column in zip(*pairs))) if pairs else []
    cuts = report_cuts(encoder, len(pairs), what, cfg)
    if counts is not None:
        counts.update(cuts)
    return ids, encoder.label_ids or None


def encode_pairs(cfg, tokenizer, pairs, counts=None):
    """Labeled pairs, with a = chosen and b = rejected."""
    return encode_for_scoring(cfg, tokenizer, [(p.prompt, p.chosen, p.rejected, p.where) for p in pairs],
                              "eval pairs", counts)


def encode_pool(cfg, tokenizer, pool, counts=None):
    return encode_for_scoring(cfg, tokenizer, [(u.prompt, u.response_a, u.response_b, u.where) for u in pool],
                              "unlabeled pairs", counts)


def score(cfg, world, model, tokenizer, encoded, desc):
    """score_encoded with the run's device, batch size, autocast and --share_prefix; encoded =
    (ids, label_ids)."""
    ids, label_ids = encoded
    share_prefix = resolve_share_prefix(cfg.share_prefix, inner(model).hf.config)
    return score_encoded(model.to(world.device), ids, tokenizer.pad_token_id, label_ids, world,
                         cfg.batch_size, autocast_dtype(cfg, world.device), desc=desc, share_prefix=share_prefix)


def score_pairs(cfg, world, model, tokenizer, pairs, encoded=None):
    """Scores of labeled pairs (score_encoded's arrays); `encoded` skips the tokenization
    when the caller has done it once already (the self-training rounds)."""
    return score(cfg, world, model, tokenizer, encoded or encode_pairs(cfg, tokenizer, pairs), "eval")


def eval_accuracy(cfg, world, model, tokenizer, pairs, encoded=None):
    """Accuracy on labeled pairs (pm: both orders, a tie counts 0.5; rm: strict)."""
    return accuracy(score_pairs(cfg, world, model, tokenizer, pairs, encoded), cfg.model_type)


def relabel(cfg, world, model, tokenizer, pool, encoded=None, temperature=1.0, previous=None):
    """Score every pair of `pool`, pseudo-label it and apply cfg.filter (filters.select).
    `encoded` = (ids, label_ids) from encode_pool, when the caller tokenized the pool already.
    previous: per pair, the pseudo-label of the last round (None where it had none); rows then
    record `stable`. Returns (rows, summary): one output row per input row, in input order.
    Gold labels are read only for the summary's accuracies (and by --label_source=gold)."""
    check_filter(cfg)
    check_gold(cfg, pool)
    cuts = {}
    scores = score(cfg, world, model, tokenizer, encoded or encode_pool(cfg, tokenizer, pool, cuts), "label")
    gold = np.array([u.gold for u in pool], dtype=object)
    chosen = select(cfg, scores, temperature, previous, gold)
    summary = {"rows": len(pool), "filter": cfg.filter, "temperature": temperature}
    if "order_disagreement" in chosen.summary:  # (the order the summary has always had)
        summary["order_disagreement"] = chosen.summary["order_disagreement"]
    if cuts:  # tokenized here (label.py): how many rows were over --max_length
        summary["truncated"] = cuts["truncated"]
    summary.update(chosen.summary)
    summary["longer_share_kept"] = longer_share_of(tokenizer, [chosen_rejected(u.response_a, u.response_b, l)
                                                              for u, l, k in zip(pool, chosen.labels, chosen.keep) if k])
    summary.update(gold_report(chosen.prob_a, chosen.labels, gold, chosen.keep))
    return [pool_row(u, i, scores, chosen, temperature) for i, u in enumerate(pool)], summary


def pool_row(u, i, scores, chosen, temperature):
    """Row i of a labeled pool: the input row, its scores, and what labeling made of it."""
    row = {**u.row, "prob_a": float(scores["prob_a"][i])}
    if "prob_a_orders" in scores:
        row["prob_a_orders"] = [float(p) for p in scores["prob_a_orders"][i]]
    if temperature != 1.0:
        row["prob_a_calibrated"] = float(chosen.prob_a[i])
    row.update(confidence=float(confidence(chosen.prob_a[i])), pseudo_label=str(chosen.labels[i]),
               keep=bool(chosen.keep[i]))
    if "reward_a" in scores:
        row["score_a"] = float(calibrated(scores["reward_a"][i], temperature))
        row["score_b"] = float(calibrated(scores["reward_b"][i], temperature))
    if chosen.status is not None:
        row["status"] = int(chosen.status[i]) or None
    if chosen.stable is not None:
        row["stable"] = chosen.stable[i]
    return row


def longer_share_of(tokenizer, pairs):
    """longer_share of (preferred, other) response texts, lengths in the tokenizer's tokens."""
    if not pairs:
        return None
    lengths = [len(ids) for ids in tokenizer([t for pair in pairs for t in pair], add_special_tokens=False)["input_ids"]]
    return longer_share(lengths[0::2], lengths[1::2])
