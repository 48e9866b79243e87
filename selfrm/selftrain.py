"""Runs: one training run (load, encode, train, save), its evaluation, and the
self-training rounds of SSRM and SER around them, with the manifest that records them.

Layout of --out_dir: a plain training run keeps its model in `model/`; a self-training run
has one folder per round, `round_K/`, each holding `model/` (when that round trained), the
labeled pool `pool.jsonl` and its `pool.summary.json`. `manifest.json` names the final model.
"""
import os
import time

import numpy as np
import torch

from selfrm import dist, settings
from selfrm.data import Encoder, load_pairs
from selfrm.files import read_json, write_json
from selfrm.metrics import accuracy
from selfrm.modeling import add_lora, load_model
from selfrm.scoring import score_encoded
from selfrm.trainer import autocast_dtype, train

# settings that do not change what a run computes: a resumed run may differ in these
RUN_INDEPENDENT = {"resume", "log_every", "save_every", "batch_size", "out_dir"}


def check_out_dir(cfg, world):
    """Claim out_dir for this run: a run with other settings there is an error, never a
    silent overwrite; the same settings resume (finished work is kept)."""
    path = os.path.join(cfg.out_dir, "settings.json")
    current = settings.to_dict(cfg)
    if os.path.exists(path):
        saved = read_json(path)
        changed = sorted(k for k in set(saved) | set(current)
                         if k not in RUN_INDEPENDENT and saved.get(k) != current.get(k))
        if changed:
            raise SystemExit(f"{cfg.out_dir} holds a run with other settings ({', '.join(changed)}): "
                             f"choose another --out_dir, or delete it to start again")
        if not cfg.resume:
            raise SystemExit(f"{cfg.out_dir} holds a run already: pass --resume=true to continue it, "
                             f"or choose another --out_dir")
    dist.barrier()
    if world.master:
        write_json(path, current)
    return current


def train_run(cfg, world, pairs, run_dir, source, round_index=0):
    """Train a model from `source` on `pairs`; save it to run_dir/model. If that model exists
    already (a finished run), load it instead. Returns (model, tokenizer, summary)."""
    model_dir = os.path.join(run_dir, "model")
    if os.path.exists(os.path.join(model_dir, "settings.json")):
        model, tokenizer = load_model(cfg, model_dir)
        return model, tokenizer, {"pairs": len(pairs), "resumed": "finished"}
    torch.manual_seed(cfg.seed + round_index)  # dropout, and the init of a toy model
    model, tokenizer = load_model(cfg, source)
    if cfg.lora:
        add_lora(model, cfg)
    encoder = Encoder(tokenizer, cfg.model_type, cfg.max_length)
    # SPEC 1a: the chosen response goes to A or B at random, seeded per round
    swaps = np.random.default_rng([cfg.seed, 1000 + round_index]).random(len(pairs)) < 0.5
    examples = encoder.encode_train(pairs, swaps)
    if encoder.truncated:
        dist.print0(f"round {round_index}: {encoder.truncated} of {len(pairs)} training pairs were longer than "
                    f"max_length={cfg.max_length} and lost the start of their prompt")
    summary = train(cfg, model, tokenizer, examples, run_dir, world, settings.to_dict(cfg), encoder.label_ids,
                    desc=f"round {round_index}")
    summary["truncated"] = encoder.truncated
    return model, tokenizer, summary


def eval_accuracy(cfg, world, model, tokenizer, pairs):
    """Accuracy on labeled pairs (pm: both orders, a tie counts 0.5; rm: strict)."""
    encoder = Encoder(tokenizer, cfg.model_type, cfg.max_length)
    encoded = encoder.encode_score([p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs])
    probs = score_encoded(model.to(world.device), encoded, tokenizer.pad_token_id, encoder.label_ids or None, world,
                          cfg.batch_size, autocast_dtype(cfg, world.device), desc="eval")
    return accuracy(probs["prob_a"], cfg.model_type)


def run_training(cfg, world, pairs, eval_pairs=None):
    """Plain supervised training (no unlabeled pool): out_dir/model and the manifest."""
    check_out_dir(cfg, world)
    start = time.time()
    model, tokenizer, summary = train_run(cfg, world, pairs, cfg.out_dir, cfg.model)
    record = {"round": 0, "train_size": len(pairs), "pseudo_labeled_share": 0.0, **summary}
    if eval_pairs:
        record["eval_accuracy"] = eval_accuracy(cfg, world, model, tokenizer, eval_pairs)
        dist.print0(f"eval accuracy: {record['eval_accuracy']:.4f} on {len(eval_pairs)} pairs")
    record["seconds"] = time.time() - start
    if world.master:
        write_json(os.path.join(cfg.out_dir, "manifest.json"), {"final_model": "model", "rounds": [record]})
    dist.print0(f"saved {os.path.join(cfg.out_dir, 'model')}")
    return record


def load_eval(cfg):
    return load_pairs(cfg.eval_file) if cfg.eval_file else None
