"""The run folder (--out_dir): who owns it (claim and lock), whether it holds this run
(settings and input files compared), what its finished rounds made (the manifest, each
round's labeled pool), and how a resumed run takes their results instead of computing them
again (RunDir.once). The rounds themselves are in rounds.py.

Layout: a plain training run keeps its model in `model/`; a self-training run has one
folder per round, `round_K/`, each holding `model/` (when that round trained), the labeled
pool `pool.jsonl` and its `pool.summary.json`. `manifest.json` names the final model.
"""
import os
import shutil
import time

import numpy as np
import torch

from selfrm import dist, settings
from selfrm.files import (Locked, dump_json, dump_jsonl, fingerprint, lock, publish_together, read_json, read_jsonl,
                          remove_leftovers, write_json)
from selfrm.settings import SettingsError

# settings that do not change what a run computes: a resumed run may differ in these
RUN_INDEPENDENT = {"resume", "overwrite", "log_every", "save_every", "batch_size", "out_dir", "preview",
                   "dist_timeout_s", "share_prefix"}  # share_prefix: the same numbers within 1e-5, faster
_LOCKS = []  # this process's open lock descriptors: closing one would release its lock


# ----------------------------------------------------------------------------- claim and compatibility

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


START_OVER = "to start over in it, pass --resume=false --overwrite=true (which deletes it); or choose another --out_dir"


def _claim(cfg, inputs):
    os.makedirs(cfg.out_dir, exist_ok=True)
    _LOCKS.append(lock(cfg.out_dir))
    settings_path, inputs_path = os.path.join(cfg.out_dir, "settings.json"), os.path.join(cfg.out_dir, "inputs.json")
    held = sorted(n for n in os.listdir(cfg.out_dir) if n != ".lock")
    if not cfg.resume:
        if held and not cfg.overwrite:
            raise SettingsError(f"{cfg.out_dir} is not empty ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}): "
                                f"--resume=false starts over only with --overwrite=true, which deletes what it holds")
        for name in held:
            path = os.path.join(cfg.out_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    elif os.path.exists(settings_path):
        _check_same_run(cfg, settings_path, inputs_path, inputs)
    removed = remove_leftovers(cfg.out_dir)
    if removed:
        dist.print0(f"{cfg.out_dir}: removed {removed} temporary files left by an interrupted run")
    if not os.path.exists(settings_path):
        write_json(inputs_path, inputs)
        write_json(settings_path, settings.to_dict(cfg))  # last: its presence marks a claimed folder


def _check_same_run(cfg, settings_path, inputs_path, inputs):
    """The folder's run is this one: the same settings (more --rounds go on from the last
    finished round) and the same input files."""
    saved, current = saved_settings(settings_path, cfg), settings.to_dict(cfg)
    changed = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed_settings(saved, current, {"rounds"})]
    if changed:
        raise SettingsError(f"{cfg.out_dir} holds a run with other settings ({'; '.join(changed[:3])}): {START_OVER}")
    if cfg.rounds < saved.get("rounds", cfg.rounds):
        raise SettingsError(f"{cfg.out_dir} holds a run of --rounds={saved['rounds']}: fewer rounds would leave "
                            f"finished ones out; pass --rounds={saved['rounds']} (or more, to go on from its last "
                            f"finished round); {START_OVER}")
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
                                f"{was['sha256'][:12]}... -> {now['sha256'][:12]}...): {START_OVER}")


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


# ----------------------------------------------------------------------------- the manifest and resume

class RunDir:
    """The folder of a self-training run: its manifest, kept in memory and rewritten after
    every round, and `once`."""

    def __init__(self, cfg, world, inputs=None):
        self.cfg, self.world = cfg, world
        self.path = os.path.join(cfg.out_dir, "manifest.json")
        self.manifest = read_json(self.path) if os.path.exists(self.path) else {**(inputs or {}), "rounds": []}
        self.rounds, self.started = self.manifest["rounds"], {}
        self.sequences = self.manifest.setdefault("sequences", {})  # the cut counts of each input file

    def once(self, t, artefact, compute):
        """What round t made of `artefact`, computed by compute() only if no finished work
        holds it: "round" -> its manifest record (compute() gives it; timed, appended, the
        manifest rewritten, the round line printed); "pool" -> (rows, summary) of its labeled
        pool, published together (a kill between the two renames leaves one: labeled again)."""
        self.started.setdefault(t, time.time())
        if artefact == "pool":
            rows_file = os.path.join(self.round_dir(t), "pool.jsonl")
            if os.path.exists(rows_file) and os.path.exists(summary_path(rows_file)):
                return read_jsonl(rows_file), read_json(summary_path(rows_file))
            if t < len(self.rounds):  # finished, its pool gone: never labeled again (by a later model)
                return self._lost_pool(t, rows_file)
            rows, summary = compute()
            if self.world.master:
                write_rows_and_summary(rows_file, rows, summary)
            return rows, summary
        if t < len(self.rounds):
            return self.rounds[t]
        record = compute()
        record["seconds"] = time.time() - self.started[t]
        self.record(record)
        return record

    def _lost_pool(self, t, rows_file):
        """A finished round whose labeled pool was deleted: SSRM's later rounds do not need it;
        SER's accumulated selection and --keep_stable's previous labels do."""
        if self.cfg.filter == "status" or self.cfg.keep_stable:
            raise SettingsError(f"{rows_file} (or its summary) is missing, but round {t} finished: resuming needs its "
                                f"labels (--filter=status accumulates them; --keep_stable compares with them); {START_OVER}")
        return [], {"kept": 0}

    def record(self, record):
        """Append a finished round to the manifest, which is rewritten whole, and say so."""
        self.rounds.append(record)
        self.manifest["final_model"] = os.path.relpath(self.last_model(), self.cfg.out_dir)
        if self.world.master:
            write_json(self.path, {"final_model": self.manifest["final_model"], **self.manifest})
        dist.print0(round_line(record))

    def round_dir(self, t):
        return os.path.join(self.cfg.out_dir, f"round_{t}")

    def last_model(self):
        """The newest trained model: a round's model folder, or --model itself."""
        for record in reversed(self.rounds):
            if "model" in record:
                return os.path.join(self.cfg.out_dir, record["model"])
        return self.cfg.model

    def temperature(self):
        """The T the newest round fitted (1.0 without --calibrate): the pool is labeled with it."""
        return last_temperature(self.rounds)


def last_temperature(rounds):
    return next((r["temperature"] for r in reversed(rounds) if "temperature" in r), 1.0)


LABELING = ("order_disagreement", "flipped", "longer_share_kept", "longer_share_labeled")  # reported when present


def round_record(t, trained, train_pairs=(), pool=None, selected=None, labeling=None):
    """A round's manifest record, in one order: what labeling the pool found (rounds >= 1:
    labeling = (pool indices labeled, summary)), the training set (train_pairs, of which
    `selected` = {pool index: (pseudo-label, p)} are pseudo-labeled pairs of `pool`), then
    what training reported (`trained`: model, loss, cuts, temperature, eval accuracy)."""
    record = {"round": t}
    if labeling:
        remaining, summary = labeling
        record.update(pool_size=len(remaining), kept=summary["kept"], pool_accuracy=summary.get("pseudo_label_accuracy"),
                      **{k: summary[k] for k in LABELING if k in summary})
        if "status_met" in summary:
            record["status"] = summary["status_met"]
    if trained is None:  # SER converged: no new model
        return record
    selected = selected or {}
    record.update(train_size=len(train_pairs), pseudo_labeled=len(selected),
                  pseudo_labeled_share=len(selected) / max(1, len(train_pairs)))
    if t > 0:
        golds = [pool[i].gold == label for i, (label, _) in selected.items() if pool[i].gold is not None]
        record["pseudo_label_accuracy"] = float(np.mean(golds)) if golds else None
    return {**record, **trained}


def round_line(record):
    """The line that says a round is done: its time and main numbers."""
    summary = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {'n/a' if v is None else v}" for k, v in record.items()
                        if k in ("train_size", "kept", "status", "pseudo_label_accuracy", "eval_accuracy"))
    return f"round {record['round']} done in {record['seconds']:.0f}s: {summary}"


# ----------------------------------------------------------------------------- labeled files

def write_rows_and_summary(path, rows, summary):
    """A labeled file and its summary, published together (files.publish_together)."""
    publish_together([(summary_path(path), lambda tmp: dump_json(tmp, summary)),
                      (path, lambda tmp: dump_jsonl(tmp, rows))])


def summary_path(out_file):
    base = out_file[:-len(".jsonl")] if out_file.endswith(".jsonl") else out_file
    return base + ".summary.json"
