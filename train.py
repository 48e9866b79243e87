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
from selfrm.checks import (check_calibration_pairs, check_filter, check_gold, check_out_dir_path, check_rules_need_pool,
                           check_template_fits, input_report, warn_unreachable_status)
from selfrm.formats import load_pairs, load_unlabeled, split_labeled
from selfrm.report import format_table, preview
from selfrm.rounds import self_train
from selfrm.rundir import RunDir, claim_out_dir, finished_run, input_fingerprints
from selfrm.settings import SettingsError, TrainSettings, cli, parse_args
from selfrm.steps import Steps, supervised_reference, supervised_run


def main(cfg):
    demo = cfg.model == "toy" and not cfg.train_file and not cfg.unlabeled_file  # the built-in task: its files
    if cfg.preview > 0:  # JSON lines on stdout, everything else on stderr, nothing written
        out = sys.stdout
        with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(sys.stderr):
            if demo:
                dist.print0(demo_banner(cfg))
                cfg = demo_settings(cfg, scratch, write=True)
            check_template_fits(cfg)
            data = read_data(cfg)
            check_settings(cfg, data)
            return preview(cfg, data[0], out)
    if demo:  # its data follows from its settings (the seed): written under out_dir/data once out_dir is claimed
        cfg = demo_settings(cfg, os.path.join(cfg.out_dir, "data"))
    finished = finished_run(cfg, demo)
    if finished:  # the first line says so: nothing below trains
        dist.print0(f"{cfg.out_dir} holds this run, finished: its final model is "
                    f"{os.path.join(cfg.out_dir, finished)}; its results follow (nothing is trained again)")
    elif demo:
        dist.print0(demo_banner(cfg))
    # ---------------------------------------------------------------- check everything before writing anything
    check_out_dir_path(cfg.out_dir)
    check_template_fits(cfg)
    data = None if demo else read_data(cfg)
    check_settings(cfg, data)
    inputs = {} if demo else input_fingerprints(cfg)
    # ---------------------------------------------------------------- init, the run folder, the data
    world = dist.compute_init(cfg.dist_timeout_s)
    try:
        claim_out_dir(cfg, world, inputs)
        if demo:
            toy.write_demo_data(os.path.dirname(cfg.train_file), cfg.seed)
            data = read_data(cfg)
        labeled, pool, eval_pairs = data
        report = input_report(eval_pairs, labeled, pool)
        dist.print0(f"{len(labeled)} labeled pairs" + (f", {len(pool)} unlabeled" if pool else "") +
                    (f", {len(eval_pairs)} eval pairs" if eval_pairs else ""))
        # ------------------------------------------------------------ train, or self-train (selfrm/rounds.py)
        if pool is None:
            return supervised_run(cfg, world, labeled, eval_pairs, report)
        warn_unreachable_status(cfg, len(pool))
        run = RunDir(cfg, world, report)
        rounds = self_train(cfg, Steps(cfg, world, run, labeled, pool, eval_pairs), run, pool)
        # ------------------------------------------------------------ the table
        if demo:  # the upper bound: the same model trained on every pool label
            full = toy.demo_files(os.path.dirname(cfg.train_file))["full"]
            rounds = rounds + [supervised_reference(cfg, world, load_pairs(full), eval_pairs)]
        dist.print0("\n" + format_table(rounds))
        if demo:
            other = "python train.py" if cfg.filter == "status" else "python train.py --model_type=rm --filter=status"
            dist.print0(f"(full: the same model trained with every pool label; the other demo: {other})")
        return rounds
    finally:
        # ------------------------------------------------------------ cleanup
        dist.compute_cleanup()


def demo_settings(cfg, folder, write=False):
    """The settings the demo's run records: its data files in `folder` (written now with write=True)."""
    files = toy.write_demo_data(folder, cfg.seed) if write else toy.demo_files(folder)
    return dataclasses.replace(cfg, train_file=files["labeled"], unlabeled_file=files["pool"],
                               eval_file=cfg.eval_file or files["eval"])


def demo_banner(cfg):
    algorithm = ("SSRM: pairwise model, confidence filter" if cfg.filter == "confidence" else
                 "SER: scalar model, learning-status filter" if cfg.filter == "status" else f"filter={cfg.filter}")
    return (f"selfrm demo ({algorithm}) on the toy task of selfrm/toy.py: round 0 trains on the labeled share, "
            f"{cfg.rounds} rounds pseudo-label the pool and retrain, then the same model trains on every label for "
            f"comparison. Output: {cfg.out_dir}/")


def check_settings(cfg, data):
    """What the data cannot support: a filter for the other kind of model, gold labels asked
    for and missing, too many --calibration_pairs, selection rules with no pool. data:
    read_data's triple, or None for the demo before its files exist."""
    if cfg.unlabeled_file or cfg.labeled_fraction:
        check_filter(cfg)
        if data:
            check_gold(cfg, data[1])
        check_calibration_pairs(cfg, len(data[0]) if data else toy.DEMO_SIZES["labeled"])
    else:
        check_rules_need_pool(cfg)


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


def settings_from_argv(argv=None):
    cfg = parse_args(TrainSettings, argv, demo=toy.demo_defaults("<model_type>", "<filter>"))  # named in --help
    if cfg.model == "toy" and not cfg.train_file and not cfg.unlabeled_file:  # the demo: its own defaults
        cfg = parse_args(TrainSettings, argv, defaults=toy.demo_defaults(cfg.model_type, cfg.filter))
    return cfg


if __name__ == "__main__":
    cli(main, settings_from_argv)
