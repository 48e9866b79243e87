"""The heavy steps, behind short calls: train a model on pairs (load it, LoRA, bf16 storage,
FSDP or DDP, trainer.py's loop, save, load it back to score with) and label a pool with it
(scoring.py). `Steps` gives rounds.py its two steps, train M_t (from --model, or the newest
model with --init_from=previous) and label the pool, and says what training reports for the
round's record; the plain supervised run and the demo's upper bound, which write their own
one-record manifests, are here too. Which pairs a round trains on is rounds.py's.
"""
import gc
import os
import time

import numpy as np
import torch

from selfrm import dist
from selfrm.checks import check_calibration_pairs
from selfrm.encoding import Encoder
from selfrm.files import read_json, write_json
from selfrm.filters import T_BOUNDS, calibrated, fit_temperature, pair_logits, temperature_nll
from selfrm.fsdp import shard_from_rank0
from selfrm.metrics import calibration
from selfrm.modeling import add_lora, has_adapters, load_model, load_tokenizer, store_frozen
from selfrm.scoring import encode_pairs, encode_pool, eval_accuracy, longer_share_of, relabel, report_cuts, score
from selfrm.settings import SettingsError
from selfrm.trainer import autocast_dtype, train


class Steps:
    """Train M_t and label the pool, for rounds.py. The pool, eval and held-out pairs are
    tokenized once (their text does not change between rounds); the newest model stays in
    memory for the next labeling (a resumed run loads it from its folder)."""

    def __init__(self, cfg, world, run, labeled, pool, eval_pairs=None):
        self.cfg, self.world, self.run, self.pool, self.model = cfg, world, run, pool, None
        self.labeled, held_out = hold_out_for_calibration(cfg, labeled)
        self.tokenizer = tokenizer = load_tokenizer(cfg)
        cuts = run.sequences
        self.pool_ids = encode_pool(cfg, tokenizer, pool, cuts.setdefault("unlabeled_file", {}))
        self.evaluation = eval_pairs and (eval_pairs, encode_pairs(cfg, tokenizer, eval_pairs, cuts.setdefault("eval_file", {})))
        self.calibration_set = held_out and (held_out, encode_pairs(cfg, tokenizer, held_out))
        self.longer_labeled = longer_share_of(tokenizer, [(p.chosen, p.rejected) for p in self.labeled])

    def train(self, t, pairs):
        """M_t trained on `pairs` from --model (round 0, and SSRM every round; --init_from=previous:
        from the newest model); round 0 with --skip_initial_training takes --model as it is.
        Then T is fitted (--calibrate) and the model evaluated. Returns what the round's record
        says of it."""
        cfg, run = self.cfg, self.run
        self.model = None  # the scorer's memory is free before the next model loads
        release_memory()
        if t == 0 and cfg.skip_initial_training:
            self.model, self.tokenizer = scoring_model(cfg, self.world, cfg.model)
            trained = {}
        else:
            source = cfg.model if t == 0 or cfg.init_from == "base" else run.last_model()
            needed = bool(self.evaluation or self.calibration_set) or t < cfg.rounds  # a model to score with
            self.model, self.tokenizer, summary = train_run(cfg, self.world, pairs, run.round_dir(t), source, t, score=needed)
            trained = {"model": f"round_{t}/model", "init_model": source_name(cfg, source),
                       "train_loss": summary.get("train_loss")}
            if t > 0:
                trained.update(truncated=summary.get("truncated"), dropped=summary.get("dropped"))
            elif "truncated" in summary:
                run.sequences["train_file"] = {"pairs": len(pairs), "truncated": summary["truncated"],
                                               "dropped": summary["dropped"]}
        if self.calibration_set:
            trained.update(fit_calibration(cfg, self.world, self.model, self.tokenizer, self.calibration_set))
        if self.evaluation and self.model is not None:
            trained["eval_accuracy"] = eval_accuracy(cfg, self.world, self.model, self.tokenizer, *self.evaluation)
        return trained

    def label(self, remaining, previous):
        """Pseudo-label and filter the pool pairs `remaining` (indices) with the newest model and
        temperature; previous: {pool index: last round's label}. Returns (rows, summary)."""
        if self.model is None:  # a resumed run: the newest model from its folder
            self.model = scoring_model(self.cfg, self.world, self.run.last_model())[0]
        ids, label_ids = self.pool_ids
        rows, summary = relabel(self.cfg, self.world, self.model, self.tokenizer, [self.pool[i] for i in remaining],
                                ([ids[i] for i in remaining], label_ids), self.run.temperature(),
                                [previous.get(i) for i in remaining])
        for row, i in zip(rows, remaining):
            row["pool_index"] = i
        summary["longer_share_labeled"] = self.longer_labeled
        return rows, summary


def source_name(cfg, source):
    """How the manifest names the model a round's training started from: --model as given,
    or a folder of this run relative to out_dir (round_1/model)."""
    return cfg.model if source == cfg.model else os.path.relpath(source, cfg.out_dir)


# ----------------------------------------------------------------------------- training

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
        summary = train(cfg, model, tokenizer, examples, run_dir, world, encoder.label_ids, desc=name,
                        counts={"truncated": encoder.truncated, "dropped": encoder.dropped})
        del model
        release_memory()
    if not score:
        return None, load_tokenizer(cfg, model_dir), summary
    model, tokenizer = scoring_model(cfg, world, model_dir)
    return model, tokenizer, summary


def scoring_model(cfg, world, source):
    """A saved model, on every rank, to score with (rounds, label.py, evaluate.py). Its weights
    are read in the compute dtype straight onto the rank's device: bf16 under --dtype=bf16 (an
    8B model's 16 GB per GPU, and no 32 GB fp32 copy in each rank's host memory on the way),
    fp32 otherwise (fp16 autocast needs fp32 weights: it keeps the norms and the residual
    stream in fp32, out of fp16's narrow range). Under --fsdp rank 0 alone reads it (fp32
    shards, computing in --dtype, as in training) and each rank scores with its shards (one
    copy in a node's host memory, not one per rank)."""
    compute_dtype = autocast_dtype(cfg, world.device)
    if getattr(cfg, "fsdp", False) and world.ddp:  # label.py and evaluate.py have no --fsdp
        model, tokenizer = load_model(cfg, source, meta=not world.master)
        return shard_from_rank0(model, world.device, world, compute_dtype), tokenizer
    dtype = torch.bfloat16 if compute_dtype == torch.bfloat16 else torch.float32
    return load_model(cfg, source, dtype=dtype, device=world.device)


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


def supervised_run(cfg, world, pairs, eval_pairs=None, inputs=None):
    """Plain supervised training (no unlabeled pool): out_dir/model and the manifest.
    `inputs` (see checks.input_report) goes into the manifest, with the cut counts of each
    file. A finished run (its manifest is written last) is reported as it is; nothing changes."""
    manifest_path = os.path.join(cfg.out_dir, "manifest.json")
    if os.path.exists(manifest_path):
        record = read_json(manifest_path)["rounds"][0]
        dist.print0(f"{cfg.out_dir} holds this run, finished: train loss {record.get('train_loss')}, "
                    f"eval accuracy {record.get('eval_accuracy')}; model in {os.path.join(cfg.out_dir, 'model')}")
        return record
    inputs, start = inputs or {}, time.time()
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
        write_json(manifest_path, {"final_model": "model", "rounds": [record], **inputs})
    dist.print0(f"saved {os.path.join(cfg.out_dir, 'model')}")
    return record


def supervised_reference(cfg, world, pairs, eval_pairs):
    """The demo's upper bound: the same model trained on every label of the pool, once (kept
    in out_dir/supervised and in the manifest)."""
    manifest_path = os.path.join(cfg.out_dir, "manifest.json")
    manifest = read_json(manifest_path)
    if "supervised" not in manifest:
        model, tokenizer, summary = train_run(cfg, world, pairs, os.path.join(cfg.out_dir, "supervised"), cfg.model,
                                              name="full supervision")
        manifest["supervised"] = {"round": "full", "train_size": len(pairs), "pseudo_labeled_share": 0.0,
                                  "eval_accuracy": eval_accuracy(cfg, world, model, tokenizer, eval_pairs)}
        if world.master:
            write_json(manifest_path, manifest)
    return manifest["supervised"]


# ----------------------------------------------------------------------------- calibration (--calibrate)

def hold_out_for_calibration(cfg, labeled):
    """(training pairs, held-out pairs): with --calibrate=temperature, cfg.calibration_pairs
    labeled pairs chosen with the run's seed leave training (every round) to fit T on."""
    if cfg.calibrate != "temperature":
        return labeled, []
    check_calibration_pairs(cfg, len(labeled))
    held = set(np.random.default_rng([cfg.seed, 2000]).permutation(len(labeled))[:cfg.calibration_pairs].tolist())
    return [p for i, p in enumerate(labeled) if i not in held], [labeled[i] for i in sorted(held)]


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
