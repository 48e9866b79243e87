"""Train a reward model, and self-train it on unlabeled pairs.

    python train.py                                   # the built-in demo (see selfrm/toy.py)
    python train.py --model_type=pm --model=M --train_file=L.jsonl --out_dir=D
    python train.py --model_type=rm --lora=true --model=M --train_file=L.jsonl --out_dir=D
    torchrun --nproc_per_node=8 train.py --model=<hub id> --train_file=L.jsonl --dtype=bf16

`python train.py --help` lists every setting.
"""
import sys

from selfrm import dist, toy
from selfrm.data import DataError, load_pairs
from selfrm.selftrain import load_eval, run_training
from selfrm.settings import SettingsError, TrainSettings, parse_args


def main(cfg):
    # ---------------------------------------------------------------- init
    world = dist.compute_init()
    try:
        # ------------------------------------------------------------ data (all read before training)
        if cfg.train_file:
            pairs = load_pairs(cfg.train_file)
        elif cfg.model == "toy":
            pairs = [p for p in toy_pairs(cfg)]
        else:
            raise SystemExit("--train_file is required unless --model=toy")
        eval_pairs = load_eval(cfg)
        dist.print0(f"{len(pairs)} training pairs" + (f", {len(eval_pairs)} eval pairs" if eval_pairs else ""))
        # ------------------------------------------------------------ train
        return run_training(cfg, world, pairs, eval_pairs)
    finally:
        # ------------------------------------------------------------ cleanup
        dist.compute_cleanup()


def toy_pairs(cfg):
    from selfrm.data import pair_from_row
    return [pair_from_row(row, f"toy:{i}") for i, row in enumerate(toy.make_pairs(cfg.seed, 2000), 1)]


if __name__ == "__main__":
    try:
        main(parse_args(TrainSettings))
    except (SettingsError, DataError) as e:
        sys.exit(f"error: {e}")
