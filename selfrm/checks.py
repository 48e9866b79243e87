"""Start-up checks: settings that cannot work together, data a setting cannot use, an out_dir
that cannot be written, a template longer than --max_length. Each raises one SettingsError
that says what to change, before anything is written; the warnings (a status no pool can
meet, eval pairs that also appear in the training data) come once the data is read."""
import json
import os

from selfrm import dist
from selfrm.encoding import Encoder
from selfrm.filters import status_needed
from selfrm.modeling import load_tokenizer
from selfrm.settings import SettingsError


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


def check_gold(cfg, pool):
    if cfg.label_source == "gold" and any(u.gold is None for u in pool):
        raise SettingsError("--label_source=gold needs a gold label on every pool row")


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


def warn_unreachable_status(cfg, pool_size):
    """--filter=status on a pool smaller than a status needs: no round can ever meet one."""
    needed = status_needed(pool_size, cfg.status_min_count, cfg.status_min_fraction)
    if cfg.filter == "status" and cfg.rounds > 0 and pool_size < needed:
        dist.print0(f"warning: --filter=status needs {needed} qualifying pairs to meet a status "
                    f"(--status_min_count={cfg.status_min_count}), more than the pool's {pool_size}: no status can be "
                    f"met and self-training stops after round 0; lower --status_min_count")


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
