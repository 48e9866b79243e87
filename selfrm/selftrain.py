"""Runs: one training run (load, encode, train, save), its evaluation, and the
self-training rounds of SSRM and SER around them, with the manifest that records them.

Layout of --out_dir: a plain training run keeps its model in `model/`; a self-training run
has one folder per round, `round_K/`, each holding `model/` (when that round trained), the
labeled pool `pool.jsonl` and its `pool.summary.json`. `manifest.json` names the final model.
"""
import gc
import json
import os
import shutil
import time

import numpy as np
import torch

from selfrm import dist, settings
from selfrm.encoding import Encoder
from selfrm.files import (Locked, dump_json, dump_jsonl, fingerprint, lock, publish_together, read_json,
                          remove_leftovers, write_json)
from selfrm.filters import (T_BOUNDS, calibrated, confidence, confidence_filter, consistent_filter, fit_temperature,
                            learning_status, logit, longer_share, order_disagreement, pseudo_label, stable_labels,
                            status_needed, temperature_nll)
from selfrm.formats import Pair
from selfrm.metrics import accuracy, bin_index, calibration
from selfrm.modeling import add_lora, has_adapters, inner, load_model, load_tokenizer, store_frozen
from selfrm.scoring import score_encoded, sigmoid
from selfrm.settings import SettingsError
from selfrm.sharing import resolve_share_prefix
from selfrm.fsdp import shard_from_rank0
from selfrm.trainer import autocast_dtype, example_length, global_batches, micro_batches, train

# settings that do not change what a run computes: a resumed run may differ in these
RUN_INDEPENDENT = {"resume", "overwrite", "log_every", "save_every", "batch_size", "out_dir", "preview",
                   "dist_timeout_s", "share_prefix"}  # share_prefix: the same numbers within 1e-5, faster
_LOCKS = []  # this process's open lock descriptors: closing one would release its lock


def input_fingerprints(cfg):
    """{setting: {"path", "size", "sha256"}} of every input file of the run."""
    return {key: {"path": getattr(cfg, key), **fingerprint(getattr(cfg, key))}
            for key in ("train_file", "unlabeled_file", "eval_file") if getattr(cfg, key)}


def claim_out_dir(cfg, world, inputs):
    """Make out_dir this run's, before anything is written in it: hold its lock for the life
    of the process; check that what it holds is this run (same settings, same input files),
    or start over (--resume=false, which needs --overwrite=true to delete a non-empty folder);
    remove the temporaries of killed writes; record settings and inputs (once: a rerun of a
    finished run changes no file). Rank 0 decides; every rank raises its error."""
    error = None
    if world.master:
        try:
            _claim(cfg, inputs)
        except (SettingsError, Locked) as e:
            error = str(e)
    failed = dist.all_reduce_sum(torch.tensor([float(error is not None)], device=world.device)).item()
    if error or failed:
        raise SettingsError(error or "rank 0 could not claim --out_dir (its error says why)")


def changed_settings(saved, current, also_ignored=()):
    """The settings (sorted) in which two runs differ, leaving out those that do not change
    what a run computes (RUN_INDEPENDENT) and `also_ignored`."""
    return [k for k in sorted(set(saved) | set(current))
            if k not in RUN_INDEPENDENT and k not in also_ignored and saved.get(k) != current.get(k)]


def saved_settings(path, cfg):
    """A run's settings.json; a setting it does not record (added to selfrm since the run
    began) as its default, which is how that run behaved."""
    return {**settings.to_dict(type(cfg)()), **read_json(path)}


def _claim(cfg, inputs):
    os.makedirs(cfg.out_dir, exist_ok=True)
    _LOCKS.append(lock(cfg.out_dir))
    settings_path, inputs_path = os.path.join(cfg.out_dir, "settings.json"), os.path.join(cfg.out_dir, "inputs.json")
    start_over = "to start over in it, pass --resume=false --overwrite=true (which deletes it); or choose another --out_dir"
    held = sorted(n for n in os.listdir(cfg.out_dir) if n != ".lock")
    if not cfg.resume:
        if held and not cfg.overwrite:
            raise SettingsError(f"{cfg.out_dir} is not empty ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}): "
                                f"--resume=false starts over only with --overwrite=true, which deletes what it holds")
        for name in held:
            path = os.path.join(cfg.out_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    elif os.path.exists(settings_path):
        saved, current = saved_settings(settings_path, cfg), settings.to_dict(cfg)
        changed = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed_settings(saved, current, {"rounds"})]
        if changed:
            raise SettingsError(f"{cfg.out_dir} holds a run with other settings ({'; '.join(changed[:3])}): {start_over}")
        if cfg.rounds < saved.get("rounds", cfg.rounds):
            raise SettingsError(f"{cfg.out_dir} holds a run of --rounds={saved['rounds']}: fewer rounds would leave "
                                f"finished ones out; pass --rounds={saved['rounds']} (or more, to go on from its last "
                                f"finished round); {start_over}")
        if cfg.rounds > saved.get("rounds", cfg.rounds):  # more rounds: finished ones stay as they are
            dist.print0(f"{cfg.out_dir}: --rounds goes from {saved['rounds']} to {cfg.rounds}: rounds that finished "
                        f"are kept, the run goes on from the last of them")
            write_json(settings_path, current)
        saved_inputs = read_json(inputs_path) if os.path.exists(inputs_path) else {}
        for key, now in inputs.items():
            was = saved_inputs.get(key)
            if was and (was["size"], was["sha256"]) != (now["size"], now["sha256"]):
                raise SettingsError(f"{cfg.out_dir} holds a run of other data: --{key}={now['path']} changed since the "
                                    f"run began (size {was['size']} -> {now['size']} bytes, sha256 "
                                    f"{was['sha256'][:12]}... -> {now['sha256'][:12]}...): {start_over}")
    removed = remove_leftovers(cfg.out_dir)
    if removed:
        dist.print0(f"{cfg.out_dir}: removed {removed} temporary files left by an interrupted run")
    if not os.path.exists(settings_path):
        write_json(inputs_path, inputs)
        write_json(settings_path, settings.to_dict(cfg))  # last: its presence marks a claimed folder


def finished_run(cfg, demo=False):
    """The final model's folder (relative to out_dir) when out_dir holds this run finished
    (its manifest records every round cfg.rounds asks for, or convergence), else None."""
    path = os.path.join(cfg.out_dir, "manifest.json")
    if not os.path.isfile(path):
        return None
    try:
        manifest, saved = read_json(path), saved_settings(os.path.join(cfg.out_dir, "settings.json"), cfg)
        rounds = manifest["rounds"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # claim_out_dir says what is wrong with it
    if changed_settings(saved, settings.to_dict(cfg)):
        return None  # another run, or more rounds: claim_out_dir decides
    self_training = demo or cfg.unlabeled_file or cfg.labeled_fraction
    done = not self_training or len(rounds) > cfg.rounds or (rounds and rounds[-1].get("status") == "converged")
    if demo and "supervised" not in manifest:
        done = False
    return manifest.get("final_model") if done else None


def train_run(cfg, world, pairs, run_dir, source, round_index=0, name=None, score=True):
    """Train a model from `source` on `pairs` and save it to run_dir/model, unless a finished
    run saved it already. `name` labels the logs (default: the round). Returns (model,
    tokenizer, summary) with the model loaded back from its folder (scoring_model): what a
    resumed run loads, so that labeling and evaluation do not depend on whether the run was
    interrupted. (The model in memory can score differently: bf16 frozen weights under
    unmerged adapters, FSDP's bf16 compute, DDP ranks that did not merge the adapters.)
    score=False: nothing will be scored with it; the model returned is None."""
    name = name or f"round {round_index}"
    model_dir = os.path.join(run_dir, "model")
    if os.path.exists(os.path.join(model_dir, "settings.json")):  # finished before: its summary was saved with it
        summary_file = os.path.join(model_dir, "summary.json")
        summary = read_json(summary_file) if os.path.exists(summary_file) else {"pairs": len(pairs)}
    else:
        torch.manual_seed(cfg.seed + round_index)  # dropout, and the init of a toy model
        # under FSDP only rank 0 reads the weights; the others receive their shards from it
        model, tokenizer = load_model(cfg, source, meta=cfg.fsdp and world.ddp and not world.master)
        if cfg.lora and not has_adapters(model):  # a saved adapter (--init_from=previous) trains on as it is
            add_lora(model, cfg)
        if cfg.weights_dtype == "bf16":
            store_frozen(model, torch.bfloat16)
        examples, encoder = encode_training(cfg, tokenizer, pairs, round_index, name)
        summary = train(cfg, model, tokenizer, examples, run_dir, world, settings.to_dict(cfg), encoder.label_ids,
                        desc=name, counts={"truncated": encoder.truncated, "dropped": encoder.dropped})
        del model
        release_memory()
    if not score:
        return None, load_tokenizer(cfg, model_dir), summary
    model, tokenizer = scoring_model(cfg, world, model_dir)
    return model, tokenizer, summary


def scoring_model(cfg, world, source):
    """A saved model, on every rank, to score with. Under --fsdp rank 0 alone reads it and each
    rank scores with its shards (one copy in a node's host memory, not one per rank)."""
    fsdp = cfg.fsdp and world.ddp
    model, tokenizer = load_model(cfg, source, meta=fsdp and not world.master)
    if fsdp:
        shard_from_rank0(model, world.device, world, autocast_dtype(cfg, world.device))
    return model, tokenizer


def release_memory():
    """Free the trained model's memory before the next one loads (FSDP's and peft's hooks make
    reference cycles that only the collector breaks)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def encode_training(cfg, tokenizer, pairs, round_index=0, name="round 0"):
    """The training examples of a round, and the encoder (its label ids and cut counts)."""
    encoder = Encoder(tokenizer, cfg.model_type, cfg.max_length, cfg.overlong)
    examples = encoder.encode_train(pairs, placement(cfg, len(pairs), round_index))
    report_cuts(encoder, len(pairs), f"{name}: training pairs", cfg)
    if not examples:
        raise SettingsError(f"{name}: every training pair is longer than --max_length={cfg.max_length} "
                         f"(--overlong=drop): nothing is left to train on")
    return examples, encoder


def placement(cfg, n, round_index):
    """SPEC 1a: the chosen response goes to A (False) or B (True) at random, seeded per round."""
    return np.random.default_rng([cfg.seed, 1000 + round_index]).random(n) < 0.5


def report_cuts(encoder, n, what, cfg):
    """Say how many pairs were cut or left out; returns the counts for the manifest."""
    counts = {"pairs": n, "truncated": encoder.truncated, "dropped": encoder.dropped}
    if encoder.truncated or encoder.dropped:
        dist.print0(f"{what}: {encoder.truncated} of {n} truncated to max_length={cfg.max_length}"
                    + (f", {encoder.dropped} dropped (--overlong=drop)" if encoder.dropped else ""))
    return counts


def preview(cfg, pairs, out):
    """Write the first cfg.preview training sequences of round 0 to `out`, exactly as the model
    receives them (rendered, truncated, decoded with special tokens), in the order training
    feeds them (one process): one JSON object a line {"text", "label", "tokens", "source"}, label
    A/B (pm) or chosen/rejected (rm: the two sequences of a pair one after the other), source the
    file:line of the pair."""
    tokenizer = load_tokenizer(cfg)
    examples, encoder = encode_training(cfg, tokenizer, pairs)
    world, name = dist.Dist(), {v: k for k, v in encoder.label_ids.items()}
    lengths = [example_length(e) for e in examples]
    sequences = []
    for batch in global_batches(lengths, cfg, world, 0):
        for micro in micro_batches(batch, cfg, world):
            for e in (examples[i] for i in micro):
                if cfg.model_type == "pm":
                    sequences.append((e["input_ids"], name[e["label"]], e["where"]))
                else:  # a whole pair: its chosen and its rejected sequence
                    sequences += [(e["chosen_ids"], "chosen", e["where"]), (e["rejected_ids"], "rejected", e["where"])]
        if len(sequences) >= cfg.preview:
            break
    if cfg.model_type == "rm" and cfg.preview % 2:  # whole pairs
        cfg_preview = cfg.preview + 1
    else:
        cfg_preview = cfg.preview
    sequences = sequences[:cfg_preview]
    for ids, label, where in sequences:
        out.write(json.dumps({"text": tokenizer.decode(ids, skip_special_tokens=False), "label": label,
                              "tokens": len(ids), "source": where}, ensure_ascii=False) + "\n")
    out.flush()
    return sequences


def encode_for_scoring(cfg, tokenizer, prompts, firsts, seconds, wheres, what, counts=None):
    """Scoring inputs (Encoder.encode_score) and the label token ids (None for rm): the pair
    `(ids, label_ids)` that `score` takes. Tokenize once, score every round. Scoring
    truncates every over-long pair (none is dropped); `counts` receives the cut counts."""
    encoder = Encoder(tokenizer, cfg.model_type, cfg.max_length)
    ids = encoder.encode_score(prompts, firsts, seconds, wheres)
    cuts = report_cuts(encoder, len(prompts), what, cfg)
    if counts is not None:
        counts.update(cuts)
    return ids, encoder.label_ids or None


def encode_pairs(cfg, tokenizer, pairs, counts=None):
    """Labeled pairs, with a = chosen and b = rejected."""
    return encode_for_scoring(cfg, tokenizer, [p.prompt for p in pairs], [p.chosen for p in pairs],
                              [p.rejected for p in pairs], [p.where for p in pairs], "eval pairs", counts)


def encode_pool(cfg, tokenizer, pool, counts=None):
    return encode_for_scoring(cfg, tokenizer, [u.prompt for u in pool], [u.response_a for u in pool],
                              [u.response_b for u in pool], [u.where for u in pool], "unlabeled pairs", counts)


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


def run_training(cfg, world, pairs, eval_pairs=None, inputs=None):
    """Plain supervised training (no unlabeled pool): out_dir/model and the manifest.
    `inputs` (see input_report) goes into the manifest, with the cut counts of each file.
    A finished run (its manifest is written last) is reported as it is, and nothing changes."""
    manifest_path = os.path.join(cfg.out_dir, "manifest.json")
    if os.path.exists(manifest_path):
        record = read_json(manifest_path)["rounds"][0]
        dist.print0(f"{cfg.out_dir} holds this run, finished: train loss {record.get('train_loss')}, "
                    f"eval accuracy {record.get('eval_accuracy')}; model in {os.path.join(cfg.out_dir, 'model')}")
        return record
    inputs = inputs or {}
    start = time.time()
    model, tokenizer, summary = train_run(cfg, world, pairs, cfg.out_dir, cfg.model, score=bool(eval_pairs))
    record = {"round": 0, "train_size": len(pairs), "pseudo_labeled_share": 0.0, **summary}
    if "truncated" in summary:
        inputs.setdefault("sequences", {})["train_file"] = {k: summary[k] for k in ("truncated", "dropped")}
    if eval_pairs:
        encoded = encode_pairs(cfg, tokenizer, eval_pairs, inputs.setdefault("sequences", {}).setdefault("eval_file", {}))
        record["eval_accuracy"] = eval_accuracy(cfg, world, model, tokenizer, eval_pairs, encoded)
        dist.print0(f"eval accuracy: {record['eval_accuracy']:.4f} on {len(eval_pairs)} pairs")
    record["seconds"] = time.time() - start
    if world.master:
        write_json(os.path.join(cfg.out_dir, "manifest.json"), {"final_model": "model", "rounds": [record], **inputs})
    dist.print0(f"saved {os.path.join(cfg.out_dir, 'model')}")
    return record


def input_report(eval_pairs, labeled, pool):
    """Evaluation pairs that also appear (same prompt and responses, in either order) in the
    training or the unlabeled data: an evaluation on them measures memory, not skill. Warns
    with the counts and returns them for the manifest."""
    if not eval_pairs:
        return {}
    key = lambda prompt, a, b: (json.dumps(prompt, sort_keys=True), frozenset((a, b)))
    seen = {"train_file": {key(p.prompt, p.chosen, p.rejected) for p in labeled},
            "unlabeled_file": {key(u.prompt, u.response_a, u.response_b) for u in pool or []}}
    counts = {name: sum(key(p.prompt, p.chosen, p.rejected) in keys for p in eval_pairs) for name, keys in seen.items()}
    for name, n in counts.items():
        if n:
            dist.print0(f"warning: {n} of {len(eval_pairs)} eval pairs also appear in the {name.replace('_', ' ')} "
                        f"(same prompt and responses): their accuracy is not a held-out measure")
    return {"eval_overlap": counts}


# ----------------------------------------------------------------------------- relabeling

def check_filter(cfg):
    if cfg.filter == "status" and cfg.model_type == "pm":
        raise SettingsError("--filter=status needs a score per response (SER's p = sigmoid(r)); a pairwise "
                         "model (--model_type=pm) only scores pairs: use --filter=confidence, or --model_type=rm")
    if cfg.filter == "consistent" and cfg.model_type == "rm":
        raise SettingsError("--filter=consistent compares the two A/B orders of a pairwise model; a scalar model "
                            "(--model_type=rm) scores each response alone and has no order: use --filter=confidence "
                            "or --filter=status")


def check_rules_need_pool(cfg):
    """The selection rules act on pseudo-labels: without a pool (--unlabeled_file or
    --labeled_fraction) they would do nothing, which a user asking for one should hear."""
    asked = [f"--{k}" + (f"={getattr(cfg, k)}" if k == "calibrate" else "") for k in ("calibrate", "keep_stable", "soft_labels")
             if getattr(cfg, k) not in (False, "none")]
    if asked:
        raise SettingsError(f"{', '.join(asked)} act on the pseudo-labels of self-training: give --unlabeled_file "
                            f"(or --labeled_fraction) to self-train, or leave {'them' if len(asked) > 1 else 'it'} out")


def pair_logits(scores):
    """z with P(a1 > a2) = sigmoid(z): rm r1 - r2; pm the logit of the order-averaged P."""
    return scores["reward_a"] - scores["reward_b"] if "reward_a" in scores else logit(scores["prob_a"])


def relabel(cfg, world, model, tokenizer, pool, encoded=None, temperature=1.0, previous=None, keep_stable=False):
    """Score every pair of `pool`, pseudo-label it and apply cfg.filter (SPEC 2-4).
    `encoded` = (ids, label_ids) from encode_pool, when the caller tokenized the pool already.
    temperature: label and filter with P_T = sigmoid(z / T) (pair_logits; SER's per-response
    scores become sigmoid(r / T)); T = 1 uses the scores as they are.
    previous: per pair, the pseudo-label of the last round (None where it had none); rows then
    record `stable`, and keep_stable keeps only pairs whose label did not flip.
    Returns (rows, summary): one output row per input row, in input order. Gold labels are
    read only for the summary's accuracies."""
    check_filter(cfg)
    cuts = {}
    scores = score(cfg, world, model, tokenizer, encoded or encode_pool(cfg, tokenizer, pool, cuts), "label")
    prob_a = scores["prob_a"] if temperature == 1.0 else calibrated(pair_logits(scores), temperature)
    labels = pseudo_label(prob_a)
    gold = np.array([u.gold for u in pool], dtype=object)
    if cfg.label_source == "gold":  # the SSRM release's filter: not semi-supervised, an explicit option only
        check_gold(cfg, pool)
        labels = gold.astype(str)
    summary = {"rows": len(pool), "filter": cfg.filter, "temperature": temperature}
    orders = scores.get("prob_a_orders")
    if orders is not None:  # the pm's position bias: how often the two orders pick different responses
        summary["order_disagreement"] = float(order_disagreement(orders).mean()) if len(pool) else 0.0
    if cuts:  # tokenized here (label.py): how many rows were over --max_length
        summary["truncated"] = cuts["truncated"]
    status = None
    stable = None if previous is None else stable_labels(labels, previous)
    allowed = None  # --keep_stable: the pairs whose label did not flip
    if stable is not None:
        summary["flipped"] = sum(s is False for s in stable) if any(p is not None for p in previous) else None
        if keep_stable:
            allowed = np.array([s is not False for s in stable], dtype=bool)
    if cfg.filter == "confidence":
        keep = confidence_filter(prob_a, cfg.threshold)
        summary["threshold"] = cfg.threshold
    elif cfg.filter == "consistent":
        keep = consistent_filter(orders, prob_a, cfg.threshold)
        summary["threshold"] = cfg.threshold
    elif cfg.filter == "status":
        score_a, score_b = sigmoid(scores["reward_a"] / temperature), sigmoid(scores["reward_b"] / temperature)
        result = learning_status(score_a, score_b, cfg.tau_high, cfg.tau_low, cfg.tau_delta,
                                 cfg.status_min_count, cfg.status_min_fraction, cfg.status_mode, allowed)
        keep, status = result.keep, result.status
        summary.update(status_met=result.met, status1_count=result.status1_count,
                       status2_count=result.status2_count, status_needed=result.needed)
    else:
        keep = np.ones(len(pool), dtype=bool)
    if allowed is not None:
        keep = keep & allowed
    summary.update(kept=int(keep.sum()), kept_share=float(keep.mean()) if len(pool) else 0.0)
    summary["longer_share_kept"] = longer_share_of(tokenizer, [chosen_rejected(u.response_a, u.response_b, l)
                                                              for u, l, k in zip(pool, labels, keep) if k])
    summary.update(gold_report(prob_a, labels, gold, keep))

    rows = []
    for i, u in enumerate(pool):
        row = {**u.row, "prob_a": float(scores["prob_a"][i])}
        if orders is not None:
            row["prob_a_orders"] = [float(p) for p in orders[i]]
        if temperature != 1.0:
            row["prob_a_calibrated"] = float(prob_a[i])
        row.update(confidence=float(confidence(prob_a[i])), pseudo_label=str(labels[i]), keep=bool(keep[i]))
        if "reward_a" in scores:
            row["score_a"] = float(sigmoid(scores["reward_a"][i] / temperature))
            row["score_b"] = float(sigmoid(scores["reward_b"][i] / temperature))
        if status is not None:
            row["status"] = int(status[i]) or None
        if stable is not None:
            row["stable"] = stable[i]
        rows.append(row)
    return rows, summary


def longer_share_of(tokenizer, pairs):
    """longer_share of (preferred, other) response texts, lengths in the tokenizer's tokens."""
    if not pairs:
        return None
    lengths = [len(ids) for ids in tokenizer([t for pair in pairs for t in pair], add_special_tokens=False)["input_ids"]]
    return longer_share(lengths[0::2], lengths[1::2])


def warn_unreachable_status(cfg, pool_size):
    """--filter=status on a pool smaller than a status needs: no round can ever meet one."""
    needed = status_needed(pool_size, cfg.status_min_count, cfg.status_min_fraction)
    if cfg.filter == "status" and cfg.rounds > 0 and pool_size < needed:
        dist.print0(f"warning: --filter=status needs {needed} qualifying pairs to meet a status "
                    f"(--status_min_count={cfg.status_min_count}), more than the pool's {pool_size}: no status can be "
                    f"met and self-training stops after round 0; lower --status_min_count")


def check_gold(cfg, pool):
    if cfg.label_source == "gold" and any(u.gold is None for u in pool):
        raise SettingsError("--label_source=gold needs a gold label on every pool row")


def gold_report(prob_a, labels, gold, keep):
    """Pseudo-label accuracy against gold labels, where rows carry them: overall, among kept
    rows, and per confidence bin (0.5-0.6 ... 0.9-1.0)."""
    has = np.array([g is not None for g in gold])
    if not has.any():
        return {}
    right = labels == gold
    conf = confidence(prob_a)
    bins = {}
    index = bin_index(conf, 10)  # the calibration table's bins: 0.7 + 0.1 falls in 0.8-0.9, as 0.8 does
    for k in range(5, 10):
        inside = has & (index == k)
        bins[f"{k / 10:.1f}-{(k + 1) / 10:.1f}"] = {"n": int(inside.sum()),
                                                   "accuracy": float(right[inside].mean()) if inside.any() else None}
    kept = has & keep
    return {"gold_rows": int(has.sum()), "pseudo_label_accuracy": float(right[has].mean()),
            "pseudo_label_accuracy_kept": float(right[kept].mean()) if kept.any() else None,
            "accuracy_by_confidence": bins}


def chosen_rejected(response_a, response_b, label):
    """(chosen, rejected) of a pair whose label ('a' or 'b') names the better response."""
    return (response_a, response_b) if label == "a" else (response_b, response_a)


def as_pairs(rows):
    """Kept rows as training pairs {prompt, chosen, rejected}, the pseudo-label deciding."""
    out = []
    for row in rows:
        if row["keep"]:
            chosen, rejected = chosen_rejected(row["response_a"], row["response_b"], row["pseudo_label"])
            out.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected})
    return out


def write_rows_and_summary(path, rows, summary):
    """A labeled file and its summary, published together (files.publish_together)."""
    publish_together([(summary_path(path), lambda tmp: dump_json(tmp, summary)),
                      (path, lambda tmp: dump_jsonl(tmp, rows))])


def summary_path(out_file):
    base = out_file[:-len(".jsonl")] if out_file.endswith(".jsonl") else out_file
    return base + ".summary.json"


# ----------------------------------------------------------------------------- the rounds

def run_self_training(cfg, world, labeled, pool, eval_pairs=None, inputs=None):
    """Round 0 trains on the labeled set (or takes --model as it is, with
    --skip_initial_training); each round t = 1..cfg.rounds labels the pool with the last
    model, filters it and trains again on
      confidence (SSRM): D_t = labeled + this round's kept pairs, from the whole pool;
      status (SER):      D_t = labeled + every pair selected so far; selected pairs leave
                         the pool, and the loop stops when no status is met.
    A re-run continues after the last finished round (finished rounds are in the manifest)."""
    check_filter(cfg)
    warn_unreachable_status(cfg, len(pool))
    labeled, held_out = hold_out_for_calibration(cfg, labeled)
    manifest_path = os.path.join(cfg.out_dir, "manifest.json")
    manifest = read_json(manifest_path) if os.path.exists(manifest_path) else {**(inputs or {}), "rounds": []}
    rounds = manifest["rounds"]
    sequences = manifest.setdefault("sequences", {})
    model = None
    # tokenized once: the pool's and the eval set's text do not change between rounds
    tokenizer = load_tokenizer(cfg)
    pool_ids, label_ids = encode_pool(cfg, tokenizer, pool, sequences.setdefault("unlabeled_file", {}))
    evaluation = (eval_pairs, encode_pairs(cfg, tokenizer, eval_pairs, sequences.setdefault("eval_file", {}))) if eval_pairs else None
    calibration_set = (held_out, encode_pairs(cfg, tokenizer, held_out)) if held_out else None
    longer_labeled = longer_share_of(tokenizer, [(p.chosen, p.rejected) for p in labeled])
    if not rounds:  # ------------------------------------------------ round 0: the seed model
        start = time.time()
        if cfg.skip_initial_training:
            model, tokenizer = scoring_model(cfg, world, cfg.model)
            record = {"round": 0, "train_size": 0, "pseudo_labeled": 0, "pseudo_labeled_share": 0.0}
        else:
            model, tokenizer, summary = train_run(cfg, world, labeled, round_dir(cfg, 0), cfg.model, 0,
                                                  score=bool(evaluation or calibration_set) or cfg.rounds > 0)
            record = {"round": 0, "train_size": len(labeled), "pseudo_labeled": 0, "pseudo_labeled_share": 0.0,
                      "model": "round_0/model", "init_model": cfg.model, "train_loss": summary.get("train_loss")}
            if "truncated" in summary:
                sequences["train_file"] = {"pairs": len(labeled), "truncated": summary["truncated"],
                                           "dropped": summary["dropped"]}
        if calibration_set:
            record.update(fit_calibration(cfg, world, model, tokenizer, calibration_set))
        finish_round(cfg, world, manifest, record, model, tokenizer, evaluation, start)

    selected = {}  # SER: pool index -> (pseudo-label, its probability), accumulated over rounds
    last_labels = None  # the pool's labels of the last round this process labeled
    for t in range(1, cfg.rounds + 1):
        if rounds[-1].get("status") == "converged":
            break
        pool_file = os.path.join(round_dir(cfg, t), "pool.jsonl")
        if t < len(rounds):  # finished earlier: only rebuild what it selected
            if cfg.filter == "status":
                selected.update(read_selected(pool_file))
            continue
        start = time.time()
        remaining = [i for i in range(len(pool)) if i not in selected]
        if os.path.exists(pool_file) and os.path.exists(summary_path(pool_file)):  # labeled before a kill
            rows, summary = read_jsonl(pool_file), read_json(summary_path(pool_file))
        else:  # (a kill between the two renames leaves one of them: the round labels again)
            if model is None:
                model = scoring_model(cfg, world, last_model(cfg, rounds))[0]
            rows, summary = relabel(cfg, world, model, tokenizer, [pool[i] for i in remaining],
                                    ([pool_ids[i] for i in remaining], label_ids), last_temperature(rounds),
                                    previous_labels(cfg, t, remaining, last_labels), cfg.keep_stable)
            for row, i in zip(rows, remaining):
                row["pool_index"] = i
            summary["longer_share_labeled"] = longer_labeled
            if world.master:
                write_rows_and_summary(pool_file, rows, summary)
        last_labels = labels_of(rows)
        record = {"round": t, "pool_size": len(remaining), "kept": summary["kept"],
                  "pool_accuracy": summary.get("pseudo_label_accuracy"),
                  **{k: summary[k] for k in ("order_disagreement", "flipped", "longer_share_kept", "longer_share_labeled")
                     if k in summary}}
        if cfg.filter == "status":
            record["status"] = summary["status_met"]
            if summary["status_met"] == "converged":  # recorded, and no new model
                finish_round(cfg, world, manifest, record, None, tokenizer, None, start)
                break
            selected.update(read_selected(rows))
            pseudo = selected
        else:
            pseudo = read_selected(rows)
        train_pairs = labeled + [pool_pair(pool[i], label, prob if cfg.soft_labels else 1.0)
                                 for i, (label, prob) in sorted(pseudo.items())]
        golds = [pool[i].gold == label for i, (label, _) in pseudo.items() if pool[i].gold is not None]
        record.update(train_size=len(train_pairs), pseudo_labeled=len(pseudo),
                      pseudo_labeled_share=len(pseudo) / max(1, len(train_pairs)),
                      pseudo_label_accuracy=float(np.mean(golds)) if golds else None)
        source = cfg.model if cfg.init_from == "base" else last_model(cfg, rounds)
        model = None  # the scorer's memory is free before the next model loads
        release_memory()
        model, tokenizer, summary = train_run(cfg, world, train_pairs, round_dir(cfg, t), source, t,
                                              score=bool(evaluation or calibration_set) or t < cfg.rounds)
        record.update(model=f"round_{t}/model", init_model=source_name(cfg, source), train_loss=summary.get("train_loss"),
                      truncated=summary.get("truncated"), dropped=summary.get("dropped"))
        if calibration_set:
            record.update(fit_calibration(cfg, world, model, tokenizer, calibration_set))
        finish_round(cfg, world, manifest, record, model, tokenizer, evaluation, start)
    return rounds


def source_name(cfg, source):
    """How the manifest names the model a round's training started from: --model as given,
    or a folder of this run relative to out_dir (round_1/model)."""
    return cfg.model if source == cfg.model else os.path.relpath(source, cfg.out_dir)


def round_dir(cfg, t):
    return os.path.join(cfg.out_dir, f"round_{t}")


def last_model(cfg, rounds):
    """The newest trained model: a round's model folder, or --model itself."""
    for record in reversed(rounds):
        if "model" in record:
            return os.path.join(cfg.out_dir, record["model"])
    return cfg.model



def pool_pair(u, label, prob=1.0):
    """A pseudo-labeled pool pair as a training pair; prob: the probability, for soft labels,
    that its chosen response is better (1.0: a hard label)."""
    return Pair(u.prompt, *chosen_rejected(u.response_a, u.response_b, label), prob=prob)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_selected(rows_or_path):
    """{pool index: (pseudo-label, P(the response it names is better))} of the kept rows of a
    labeled round; the probability is the (calibrated) P(a1 > a2) or 1 minus it, whatever
    chose the label (the argmax, or a gold label with --label_source=gold)."""
    rows = read_jsonl(rows_or_path) if isinstance(rows_or_path, str) else rows_or_path
    selected = {}
    for row in rows:
        if row["keep"]:
            p_a = row.get("prob_a_calibrated", row["prob_a"])
            selected[row["pool_index"]] = (row["pseudo_label"], p_a if row["pseudo_label"] == "a" else 1.0 - p_a)
    return selected


def labels_of(rows):
    """{pool index: pseudo-label} of a labeled round's rows."""
    return {row["pool_index"]: row["pseudo_label"] for row in rows}


def previous_labels(cfg, t, remaining, last):
    """The pseudo-label each pool pair in `remaining` got in round t - 1 (None in round 1,
    which has no previous labeling): from `last` (labels_of that round's rows, kept in memory
    on every rank), or read back from its pool file when this process did not label it."""
    if t < 2:
        return [None] * len(remaining)
    last = last if last is not None else labels_of(read_jsonl(os.path.join(round_dir(cfg, t - 1), "pool.jsonl")))
    return [last.get(i) for i in remaining]


# ----------------------------------------------------------------------------- calibration

def hold_out_for_calibration(cfg, labeled):
    """(training pairs, held-out pairs): with --calibrate=temperature, cfg.calibration_pairs
    labeled pairs chosen with the run's seed leave training (every round) to fit T on."""
    if cfg.calibrate != "temperature":
        return labeled, []
    check_calibration_pairs(cfg, len(labeled))
    n = cfg.calibration_pairs
    held = set(np.random.default_rng([cfg.seed, 2000]).permutation(len(labeled))[:n].tolist())
    return [p for i, p in enumerate(labeled) if i not in held], [labeled[i] for i in sorted(held)]


def check_calibration_pairs(cfg, n_labeled):
    """--calibration_pairs must leave labeled pairs to train round 0 on."""
    n = cfg.calibration_pairs
    if cfg.calibrate != "temperature":
        return
    if n > n_labeled:
        raise SettingsError(f"--calibration_pairs={n}: there are only {n_labeled} labeled pairs to hold out; "
                            f"lower --calibration_pairs")
    if n == n_labeled and not cfg.skip_initial_training:
        raise SettingsError(f"--calibration_pairs={n} holds out {n} of the {n_labeled} labeled pairs: none would "
                            f"be left to train round 0 on; lower --calibration_pairs")


def fit_calibration(cfg, world, model, tokenizer, calibration_set):
    """Fit the temperature T on the held-out pairs (chosen as a1) with the model just trained:
    {"temperature": T, "calibration": {pairs, nll_before, nll_after, ece_before, ece_after}}."""
    pairs, encoded = calibration_set
    z = pair_logits(score(cfg, world, model, tokenizer, encoded, "calibrate"))
    t = fit_temperature(z)
    report = {"pairs": len(pairs), "nll_before": temperature_nll(z, 1.0), "nll_after": temperature_nll(z, t),
              "ece_before": calibration(calibrated(z, 1.0))["ece"], "ece_after": calibration(calibrated(z, t))["ece"],
              "at_bound": t in T_BOUNDS}
    dist.print0(f"temperature T = {t:.4f} on {len(pairs)} held-out pairs: NLL {report['nll_before']:.4f} -> "
                f"{report['nll_after']:.4f}, ECE {report['ece_before']:.4f} -> {report['ece_after']:.4f}")
    if report["at_bound"]:
        dist.print0(f"warning: T = {t} is a bound of its range {T_BOUNDS}: the held-out pairs do not pin it "
                    f"(every one ranked right drives T to {T_BOUNDS[0]}); more --calibration_pairs would")
    return {"temperature": t, "calibration": report}


def last_temperature(rounds):
    """The T the newest round fitted (1.0 without --calibrate): the pool is labeled with it."""
    return next((r["temperature"] for r in reversed(rounds) if "temperature" in r), 1.0)


def finish_round(cfg, world, manifest, record, model, tokenizer, evaluation, start):
    """Evaluate on evaluation = (pairs, their encoding), time and record a round; the
    manifest is rewritten after every round."""
    if evaluation and model is not None:
        record["eval_accuracy"] = eval_accuracy(cfg, world, model, tokenizer, *evaluation)
    record["seconds"] = time.time() - start
    rounds = manifest["rounds"]
    rounds.append(record)
    manifest["final_model"] = os.path.relpath(last_model(cfg, rounds), cfg.out_dir)
    if world.master:
        write_json(os.path.join(cfg.out_dir, "manifest.json"), {"final_model": manifest["final_model"], **manifest})
    summary = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {'n/a' if v is None else v}" for k, v in record.items()
                        if k in ("train_size", "kept", "status", "pseudo_label_accuracy", "eval_accuracy"))
    dist.print0(f"round {record['round']} done in {record['seconds']:.0f}s: {summary}")


COLUMNS = [("round", "round", "{}"), ("train_size", "train", "{}"), ("pseudo_labeled_share", "pseudo share", "{:.3f}"),
           ("kept", "kept", "{}"), ("status", "status", "{}"), ("pseudo_label_accuracy", "pseudo acc", "{:.4f}"),
           ("eval_accuracy", "eval acc", "{:.4f}"), ("seconds", "seconds", "{:.0f}")]


def format_table(rounds):
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rounds)]
    lines = ["| " + " | ".join(name for _, name, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rounds:
        cells = [fmt.format(r[key]) if r.get(key) is not None else "" for key, _, fmt in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
