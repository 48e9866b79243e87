"""Train a reward model, and self-train it on unlabeled pairs.

    python train.py                                   # the demo: SSRM on the toy task (selfrm/toy.py)
    python train.py --model_type=rm --filter=status   # the demo's SER variant
    python train.py --model_type=pm --model=M --train_file=L.jsonl --out_dir=D
    python train.py --model_type=rm --lora=true --model=M --train_file=L.jsonl --out_dir=D
    python train.py --model=M --train_file=L.jsonl --preview=5          # the first 5 sequences as the model sees them
    python train.py --model_type=pm --model=M --train_file=L.jsonl --unlabeled_file=U.jsonl \
        --rounds=3 --filter=confidence --eval_file=E.jsonl --out_dir=D     # SSRM
    python train.py --model_type=rm --model=M --train_file=L.jsonl --unlabeled_file=U.jsonl \
        --filter=status --eval_file=E.jsonl --out_dir=D                    # SER
    torchrun --nproc_per_node=8 train.py --model=<hub id> --train_file=L.jsonl --dtype=bf16

`python train.py --help` lists every setting.
"""
import contextlib
import dataclasses
import os
import sys
import tempfile

from selfrm import dist, toy
from selfrm.encoding import Encoder
from selfrm.formats import load_pairs, load_unlabeled, split_labeled
from selfrm.modeling import load_tokenizer
from selfrm.files import read_json, write_json
from selfrm.selftrain import (check_filter, check_gold, check_calibration_pairs, check_rules_need_pool, claim_out_dir,
                             eval_accuracy, finished_run, format_table, input_fingerprints, input_report,
                             preview, run_self_training, run_training, train_run)
from selfrm.settings import SettingsError, TrainSettings, cli, parse_args


def main(cfg):
    if cfg.preview > 0:  # JSON lines on stdout, everything else on stderr, nothing written
        out = sys.stdout
        with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(sys.stderr):
            return run(cfg, scratch, preview_to=out)
    return run(cfg, os.path.join(cfg.out_dir, "data"))


def run(cfg, demo_data_dir, preview_to=None):
    # ---------------------------------------------------------------- the demo's data, when no file is given
    demo = cfg.model == "toy" and not cfg.train_file and not cfg.unlabeled_file
    if demo:  # the settings the demo's run records: its data files
        files = toy.demo_files(demo_data_dir)
        demo_cfg = dataclasses.replace(cfg, train_file=files["labeled"], unlabeled_file=files["pool"],
                                       eval_file=cfg.eval_file or files["eval"])
    finished = preview_to is None and finished_run(demo_cfg if demo else cfg, demo)
    if finished:  # the first line says so: nothing below trains
        dist.print0(f"{cfg.out_dir} holds this run, finished: its final model is "
                    f"{os.path.join(cfg.out_dir, finished)}; its results follow (nothing is trained again)")
    if demo:
        algorithm = ("SSRM: pairwise model, confidence filter" if cfg.filter == "confidence" else
                     "SER: scalar model, learning-status filter" if cfg.filter == "status" else f"filter={cfg.filter}")
        if not finished:
            dist.print0(f"selfrm demo ({algorithm}) on the toy task of selfrm/toy.py: round 0 trains on the labeled "
                        f"share, {cfg.rounds} rounds pseudo-label the pool and retrain, then the same model trains "
                        f"on every label for comparison. Output: {cfg.out_dir}/")
        cfg = demo_cfg
    # ---------------------------------------------------------------- check everything before writing anything
    if preview_to is None:
        check_out_dir_path(cfg.out_dir)
    check_template_fits(cfg)
    if demo and preview_to is not None:
        toy.write_demo_data(demo_data_dir, cfg.seed)
    data = None if demo and preview_to is None else read_data(cfg)  # the demo's data is written after the claim
    if cfg.unlabeled_file or cfg.labeled_fraction:
        check_filter(cfg)
        if data:
            check_gold(cfg, data[1])
        # too many --calibration_pairs: said before any write (the demo's data is written later)
        check_calibration_pairs(cfg, len(data[0]) if data else toy.DEMO_SIZES["labeled"])
    else:
        check_rules_need_pool(cfg)
    if preview_to is not None:
        return preview(cfg, data[0], preview_to)
    inputs = {} if demo else input_fingerprints(cfg)  # the demo's data follows from its settings (the seed)
    # ---------------------------------------------------------------- init
    world = dist.compute_init(cfg.dist_timeout_s)
    try:
        claim_out_dir(cfg, world, inputs)
        if demo:
            toy.write_demo_data(demo_data_dir, cfg.seed)
            data = read_data(cfg)
        labeled, pool, eval_pairs = data
        report = input_report(eval_pairs, labeled, pool)
        dist.print0(f"{len(labeled)} labeled pairs" + (f", {len(pool)} unlabeled" if pool else "") +
                    (f", {len(eval_pairs)} eval pairs" if eval_pairs else ""))
        # ------------------------------------------------------------ train (and self-train)
        if pool is None:
            return run_training(cfg, world, labeled, eval_pairs, report)
        rounds = run_self_training(cfg, world, labeled, pool, eval_pairs, report)
        if demo:  # the upper bound: the same model trained on every pool label
            rounds = rounds + [supervised_reference(cfg, world, load_pairs(files["full"]), eval_pairs)]
        dist.print0("\n" + format_table(rounds))
        if demo:
            other = "python train.py" if cfg.filter == "status" else "python train.py --model_type=rm --filter=status"
            dist.print0(f"(full: the same model trained with every pool label; the other demo: {other})")
        return rounds
    finally:
        # ------------------------------------------------------------ cleanup
        dist.compute_cleanup()


def read_data(cfg):
    """(labeled pairs, unlabeled pool or None, eval pairs or None), every file read and
    checked (a bad row is a DataError naming its file, line and field)."""
    labeled = load_pairs(cfg.train_file, cfg.format, cfg.bad_rows) if cfg.train_file else []
    pool = (load_unlabeled(cfg.unlabeled_file, cfg.format, cfg.as_unlabeled, cfg.seed, cfg.bad_rows)
            if cfg.unlabeled_file else None)
    if cfg.labeled_fraction > 0:  # one labeled file -> a labeled share and a pool (the papers' set-ups)
        if pool is not None:
            raise SettingsError("--labeled_fraction splits --train_file into a labeled share and a pool: "
                                "give no --unlabeled_file with it")
        labeled, pool = split_labeled(labeled, cfg.labeled_fraction, cfg.seed)
    eval_pairs = load_pairs(cfg.eval_file, cfg.format, cfg.bad_rows) if cfg.eval_file else None
    if not labeled and not (pool and cfg.skip_initial_training):
        raise SettingsError("--train_file is required (or --unlabeled_file with --skip_initial_training=true)")
    with_margin = sum(1 for p in labeled if p.margin)
    if cfg.model_type == "pm" and with_margin:
        dist.print0(f"warning: {cfg.train_file}: {with_margin} pairs carry a 'margin': a pairwise model (pm) has no "
                    f"margin, so it is ignored")
    return labeled, pool, eval_pairs


def check_out_dir_path(out_dir):
    """--out_dir must be a folder this process can write, or a path where one can be made."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SettingsError(f"--out_dir={out_dir}: is a file, not a folder")
    probe = os.path.abspath(out_dir)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise SettingsError(f"--out_dir={out_dir}: {probe} is not a folder this process may write in")


def check_template_fits(cfg):
    """--max_length must hold the template with one token of context and of each response."""
    needed = Encoder(load_tokenizer(cfg), cfg.model_type, cfg.max_length).minimum_length()
    if cfg.max_length < needed:
        raise SettingsError(f"--max_length={cfg.max_length}: the template with one token of context and of each "
                            f"response takes {needed} tokens for this model: use --max_length={needed} or more")


def supervised_reference(cfg, world, pairs, eval_pairs):
    """Train on all labels once (kept in out_dir/supervised and in the manifest)."""
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


def settings_from_argv(argv=None):
    cfg = parse_args(TrainSettings, argv, demo=toy.demo_defaults("<model_type>", "<filter>"))  # named in --help
    if cfg.model == "toy" and not cfg.train_file and not cfg.unlabeled_file:  # the demo: its own defaults
        cfg = parse_args(TrainSettings, argv, defaults=toy.demo_defaults(cfg.model_type, cfg.filter))
    return cfg


if __name__ == "__main__":
    cli(main, settings_from_argv)
