"""Train a reward model, and self-train it on unlabeled pairs.

    python train.py                                   # the built-in demo (see selfrm/toy.py)
    python train.py --model_type=pm --model=M --train_file=L.jsonl --out_dir=D
    python train.py --model_type=rm --lora=true --model=M --train_file=L.jsonl --out_dir=D
    python train.py --model_type=pm --model=M --train_file=L.jsonl --unlabeled_file=U.jsonl \
        --rounds=3 --filter=confidence --eval_file=E.jsonl --out_dir=D     # SSRM
    python train.py --model_type=rm --model=M --train_file=L.jsonl --unlabeled_file=U.jsonl \
        --filter=status --eval_file=E.jsonl --out_dir=D                    # SER
    torchrun --nproc_per_node=8 train.py --model=<hub id> --train_file=L.jsonl --dtype=bf16

`python train.py --help` lists every setting.
"""
import sys

from selfrm import dist
from selfrm.data import DataError, load_pairs, load_unlabeled
from selfrm.selftrain import run_self_training, run_training
from selfrm.settings import SettingsError, TrainSettings, parse_args


def main(cfg):
    # ---------------------------------------------------------------- data (all read before any training)
    labeled = load_pairs(cfg.train_file) if cfg.train_file else []
    pool = load_unlabeled(cfg.unlabeled_file) if cfg.unlabeled_file else None
    eval_pairs = load_pairs(cfg.eval_file) if cfg.eval_file else None
    if not labeled and not (pool and cfg.skip_initial_training):
        raise SettingsError("--train_file is required (or --unlabeled_file with --skip_initial_training=true)")
    # ---------------------------------------------------------------- init
    world = dist.compute_init()
    try:
        dist.print0(f"{len(labeled)} labeled pairs" + (f", {len(pool)} unlabeled" if pool else "") +
                    (f", {len(eval_pairs)} eval pairs" if eval_pairs else ""))
        # ------------------------------------------------------------ train (and self-train)
        if pool is None:
            return run_training(cfg, world, labeled, eval_pairs)
        return run_self_training(cfg, world, labeled, pool, eval_pairs)
    finally:
        # ------------------------------------------------------------ cleanup
        dist.compute_cleanup()


if __name__ == "__main__":
    try:
        main(parse_args(TrainSettings))
    except (SettingsError, DataError) as e:
        sys.exit(f"error: {e}")
