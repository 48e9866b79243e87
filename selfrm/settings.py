"""Settings: one dataclass per script, and the command-line parser that fills it.

Every script takes `--key value` or `--key=value` flags, a bare `--flag` for a boolean
(`--no_flag` or `--flag=false` to turn it off), and `--config=FILE.json` (a JSON object of
the same keys; flags given after it on the command line win). An unknown key, a value of the
wrong type or one outside its choices is an error that names the key (and the closest
setting, for a misspelling). Each field is `setting(default, help)`: the help text lives in the
field's metadata, and `python train.py --help` prints it, in the groups of GROUPS.
"""
import argparse
import dataclasses
import difflib
import json
import math
import sys
from dataclasses import dataclass
from typing import ClassVar


class InputError(ValueError):
    """A bad setting or bad input: the scripts print it as one line, `error: ...`, exit 2."""


class SettingsError(InputError):
    pass


def cli(main, parse):
    """Run a script: a bad setting or input is one line on stderr and exit code 2; a collective
    that timed out under torchrun is one line and exit code 1; SIGTERM or SIGUSR1 (preemption,
    see dist.py) is one line and exit code 128 + the signal. Nothing else is caught."""
    from selfrm.dist import Preempted, catch_preemption, leave, timed_out
    catch_preemption()
    try:
        main(parse())
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        leave(2)
    except Preempted as e:  # SIGTERM/SIGUSR1: what could be saved was; the line says how to go on
        print(f"preempted: {e}", file=sys.stderr)
        leave(128 + e.signum)
    except Exception as e:
        if not timed_out(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: a collective timed out: a rank stopped answering for --dist_timeout_s ({first})", file=sys.stderr)
        leave(1)
    leave(0)


# ----------------------------------------------------------------------------- shared groups

def setting(default, help):
    """A field and its --help text, kept as data: any text, wrapped or holding a '#', reads whole."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class ModelSettings:
    model: str = setting("toy", "local folder, hub id, or 'toy' (the built-in tiny model and task)")
    model_type: str = setting("pm", "pm: pairwise preference LM (SSRM); rm: scalar reward model (SER)")
    gguf_file: str = setting("", "the .gguf file to load from --model, a folder (or hub repo) of GGUF weights; needs gguf")
    trust_remote_code: bool = setting(False, "run code shipped with a hub model; off unless asked for")
    format: str = setting("auto", "data format: auto|jsonl|hh|sharegpt|stack_exchange|implicit_prompt (.parquet files too)")
    bad_rows: str = setting("error", "error: a bad row stops the run | skip: report each bad row (file:line: field), go on")
    max_length: int = setting(512, "tokens per sequence; a longer pair has its content cut, never its template")
    dtype: str = setting("auto", "bf16|fp16|fp32 autocast; auto = bf16 on a CUDA GPU that has it, else fp32")
    share_prefix: str = setting("auto", "a pair's two sequences in one row, their common prefix computed once (rm training, rm and pm scoring); auto = on for Llama, Mistral, Qwen2, Gemma-2 (exact there), off otherwise")
    seed: int = setting(0, "one seed for data order, A/B placement, splits and initialisation")
    dist_timeout_s: int = setting(1800, "under torchrun: seconds a collective waits for a rank that stopped answering")


@dataclass
class FilterSettings:
    filter: str = setting("confidence", "confidence (SSRM) | status (SER learning status) | consistent (pm: both orders agree, and confidence) | none")
    threshold: float = setting(0.8, "confidence filter: keep a pair when max(P, 1-P) >= threshold, P = P(a1 > a2)")
    tau_high: float = setting(0.55, "status 1 (rm): one response's p = sigmoid(reward), in [0, 1], is above this...")
    tau_low: float = setting(0.45, "...and the other's p = sigmoid(reward) is below this")
    tau_delta: float = setting(0.3, "status 2: |p(a1) - p(a2)| above this, p = sigmoid(reward)")
    status_min_count: int = setting(600, "a status is met when at least this many pairs of the pool qualify (a pair count)")
    status_min_fraction: float = setting(0.0, "...or this share of the pool, whichever is larger")
    status_mode: str = setting("sequential", "sequential (the paper: status 1, else 2) | union (released code)")
    label_source: str = setting("argmax", "argmax (the paper) | gold (the SSRM release's filter: keeps gold order; not semi-supervised)")
    batch_size: int = setting(32, "pairs per batch when scoring (labeling the pool, evaluation); not used in training")
    as_unlabeled: bool = setting(False, "the unlabeled file is a labeled one: hide its labels (kept for reporting)")


# ----------------------------------------------------------------------------- per script

@dataclass
class TrainSettings(ModelSettings, FilterSettings):
    script: ClassVar[str] = "train.py"  # what --help and errors call it
    choices: ClassVar[dict] = {"model_type": ("pm", "rm")}  # training needs to know the kind
    train_file: str = setting("", "labeled pairs; empty = the built-in toy task (with --model=toy)")
    labeled_fraction: float = setting(0.0, "> 0: keep this share of --train_file labeled, the rest becomes the pool")
    eval_file: str = setting("", "labeled pairs scored after each round")
    out_dir: str = setting("runs/demo", "run folder: model/, settings.json, manifest.json, logs")
    resume: bool = setting(True, "continue a run found in out_dir (same settings and inputs); finished work is kept")
    overwrite: bool = setting(False, "with --resume=false: delete what out_dir holds and start over")
    # optimisation
    epochs: int = setting(1, "passes over the training set per round (SSRM: 1; SER: 2)")
    max_steps: int = setting(0, "stop after this many optimizer steps (0 = no limit)")
    lr: float = setting(5e-6, "peak learning rate")
    schedule: str = setting("cosine", "cosine | linear | constant, after the warm-up")
    warmup_steps: int = setting(40, "linear warm-up from 0")
    weight_decay: float = setting(0.0, "AdamW decoupled weight decay")
    grad_clip: float = setting(1.0, "max global grad norm (0 = off)")
    global_batch_size: int = setting(128, "pairs per optimizer step, over all ranks")
    micro_batch_size: int = setting(4, "pairs per forward on one rank (accumulation fills the rest)")
    group_by_length: bool = setting(False, "micro-batches of similar length inside each global batch")
    gradient_checkpointing: bool = setting(False, "trade compute for activation memory")
    fsdp: bool = setting(False, "under torchrun: shard weights, gradients and optimizer state (FSDP2) instead of DDP")
    overlong: str = setting("truncate", "pairs over --max_length: truncate (cut content, never the template) | drop (leave out; the released code)")
    preview: int = setting(0, "print the first N training sequences as the model receives them (JSON lines), then exit")
    margin: float = setting(0.0, "rm: m in -log sigmoid(r_c - r_r - m); a row's 'margin' field adds to it")
    center_rewards_coefficient: float = setting(0.0, "rm: adds c * mean((r_c + r_r)^2) to the loss (TRL's option; 0 = off)")
    # LoRA
    lora: bool = setting(False, "train LoRA adapters instead of all weights")
    lora_r: int = setting(8, "rank of each adapter: a weight W trains as W + (lora_alpha / lora_r) * B A, B A of this rank")
    lora_alpha: int = setting(32, "scale of the adapters: their update B A is multiplied by lora_alpha / lora_r")
    lora_dropout: float = setting(0.1, "dropout on what enters the adapters, in training")
    lora_target_modules: str = setting("", "comma-separated module names; empty = peft's default for the model")
    save_adapter_only: bool = setting(False, "save the LoRA adapter (+ score head) instead of the merged model")
    weights_dtype: str = setting("fp32", "frozen weights (the base under --lora): fp32 | bf16 (half their memory); trainable ones stay fp32")
    # bookkeeping
    log_every: int = setting(10, "steps between log lines (and JSONL rows in train_log.jsonl)")
    save_every: int = setting(100, "steps between resumable checkpoints (0 = only at the end)")
    # self-training (active when --unlabeled_file is given)
    unlabeled_file: str = setting("", "pool of unlabeled pairs {prompt, response_a, response_b}")
    rounds: int = setting(3, "self-training rounds after round 0 (up to rounds+1 trained models)")
    init_from: str = setting("base", "base: each round restarts from --model (SSRM); previous: from the last round")
    skip_initial_training: bool = setting(False, "--model is already a reward model: no round-0 training")
    # selection rules beyond the papers (off by default)
    calibrate: str = setting("none", "temperature: after each round, fit one T on held-out labeled pairs; label with sigmoid(logit(P) / T)")
    calibration_pairs: int = setting(100, "--calibrate=temperature: labeled pairs held out of training to fit T on (seeded, the same every round)")
    keep_stable: bool = setting(False, "from the second labeled round: keep a pair only if its pseudo-label equals the previous round's")
    soft_labels: bool = setting(False, "a pseudo-labeled pair trains towards its (calibrated) probability, not the hard label")


@dataclass
class LabelSettings(ModelSettings, FilterSettings):
    script: ClassVar[str] = "label.py"
    model_type: str = setting("auto", "auto: from the model's settings.json or architecture; pm | rm overrides")
    max_length: int = setting(0, "tokens per sequence; 0 = the max_length the model was trained at (its settings.json), else 512")
    unlabeled_file: str = setting("", "input pool {prompt, response_a, response_b, ...}")
    out_file: str = setting("", "output JSONL; a summary goes to <out_file minus .jsonl>.summary.json")
    emit: str = setting("rows", "rows: every input row plus scores | pairs: kept rows as {prompt, chosen, rejected}")
    temperature: float = setting(1.0, "label with P_T = sigmoid(logit(P) / T) (a T that train.py --calibrate=temperature fitted); 1 = as scored")


@dataclass
class EvalSettings(ModelSettings):
    script: ClassVar[str] = "evaluate.py"
    model_type: str = setting("auto", "auto: from the model's settings.json or architecture; pm | rm overrides")
    max_length: int = setting(0, "tokens per sequence; 0 = the max_length the model was trained at (its settings.json), else 512")
    eval_file: str = setting("", "labeled pairs {prompt, chosen, rejected, [subset], [id]}")
    out_file: str = setting("", "metrics JSON (empty = print only)")
    predictions_file: str = setting("", "one row per pair: id, subset, prob_chosen, correct")
    batch_size: int = setting(32, "pairs per batch when scoring")
    limit: int = setting(0, "evaluate the first N pairs only (0 = all)")
    plot: bool = setting(True, "write <out_file>.png when matplotlib is installed")


CHOICES = {
    "model_type": ("auto", "pm", "rm"),
    "dtype": ("auto", "bf16", "fp16", "fp32"),
    "format": ("auto", "jsonl", "hh", "sharegpt", "stack_exchange", "implicit_prompt"),
    "bad_rows": ("error", "skip"),
    "filter": ("confidence", "status", "consistent", "none"),
    "calibrate": ("none", "temperature"),
    "status_mode": ("sequential", "union"),
    "label_source": ("argmax", "gold"),
    "schedule": ("cosine", "linear", "constant"),
    "weights_dtype": ("fp32", "bf16"),
    "init_from": ("base", "previous"),
    "emit": ("rows", "pairs"),
    "overlong": ("truncate", "drop"),
    "share_prefix": ("auto", "true", "false"),
}

# --help lists the settings in these groups, in the order a user needs them (a script shows
# the groups it has); a setting in no group lands in a last group, "other"
GROUPS = {
    "model and data": ("model", "model_type", "gguf_file", "trust_remote_code", "dtype", "share_prefix", "train_file",
                       "labeled_fraction", "unlabeled_file", "as_unlabeled", "eval_file", "format", "bad_rows",
                       "max_length", "overlong", "preview", "out_file", "predictions_file", "emit", "limit", "plot",
                       "seed"),
    "training": ("epochs", "max_steps", "lr", "schedule", "warmup_steps", "weight_decay", "grad_clip",
                 "global_batch_size", "micro_batch_size", "group_by_length", "gradient_checkpointing", "margin",
                 "center_rewards_coefficient"),
    "LoRA": ("lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "save_adapter_only",
             "weights_dtype"),
    "self-training and filters": ("rounds", "init_from", "skip_initial_training", "filter", "threshold", "tau_high",
                                  "tau_low", "tau_delta", "status_min_count", "status_min_fraction", "status_mode",
                                  "label_source", "temperature", "calibrate", "calibration_pairs", "keep_stable",
                                  "soft_labels"),
    "scoring": ("batch_size",),
    "distributed (torchrun)": ("fsdp", "dist_timeout_s"),
    "bookkeeping": ("out_dir", "resume", "overwrite", "log_every", "save_every"),
}


# ----------------------------------------------------------------------------- parsing
# argparse (the standard library) rather than transformers' HfArgumentParser: it lets
# `--config=FILE.json` take its place among the flags (later ones win, in order), and needs
# nothing selfrm does not already depend on.

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # a SettingsError, not argparse's exit: callers print `error: ...`
        raise SettingsError(message.replace("argument ", ""))


def _flag_value(key, typ):
    """The converter of one flag's text: a clear message for a wrong type."""
    def convert(text):
        if typ is bool:
            low = text.strip().lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        try:
            return typ(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {typ.__name__}, got {text!r}") from None
    convert.__name__ = typ.__name__
    return convert


def _config_value(key, value, typ):
    """A value from a JSON config is typed already: check it (an int may stand for a float)."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not typ:
        raise SettingsError(f"{key}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


class _Config(argparse.Action):
    """--config=FILE.json: every key of the file, as if given as flags at this place."""

    def __call__(self, parser, namespace, path, option_string=None):
        try:
            with open(path) as f:
                loaded = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise SettingsError(f"--config={path}: {e}") from None
        if not isinstance(loaded, dict):
            raise SettingsError(f"--config={path}: expected a JSON object of settings")
        for key, value in loaded.items():
            if key not in parser.field_types:
                raise SettingsError(f"--config={path}: {unknown_setting(key, parser)}")
            setattr(namespace, key, _config_value(key, value, parser.field_types[key]))


def build_parser(cls, defaults=None, demo=None):
    """An argparse parser for the fields of `cls`: `--key value`, `--key=value`, a bare
    `--flag` for a boolean (`--no_flag` or `--flag=false` turns it off), `--config=FILE.json`.
    `demo` (train.py) holds the values of the built-in demo: the help names those that differ."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    parser = _Parser(prog=cls.script, allow_abbrev=False, argument_default=argparse.SUPPRESS,
                     usage="%(prog)s [--config=FILE.json] [--key value | --key=value | --flag | --no_flag] ...",
                     description=f"The settings of {cls.script}. --config=FILE.json reads a JSON object of them; "
                                 "flags after it win.",
                     epilog="The demo (python train.py with no --train_file or --unlabeled_file) uses its own "
                            "values where a setting says 'demo:'." if demo else None)
    parser.field_types = {k: f.type for k, f in fields.items()}
    parser.add_argument("--config", action=_Config, metavar="FILE.json",
                        help="a JSON object of settings, applied at its place among the flags")
    grouped = [(title, [k for k in keys if k in fields]) for title, keys in GROUPS.items()]
    grouped.append(("other", [k for k in fields if not any(k in keys for keys in GROUPS.values())]))
    for title, keys in grouped:
        group = parser.add_argument_group(title) if keys else None
        for key in keys:
            f = fields[key]
            default = (defaults or {}).get(key, f.default)
            shown = f"default: {default!r}"
            if demo and key in demo and demo[key] != default:
                shown += f"; demo: {demo[key]!r}"
            text = f"{f.metadata.get('help', '')} ({shown})"
            if f.type is bool:
                group.add_argument(f"--{key}", nargs="?", const=True, type=_flag_value(key, bool), help=text,
                                   metavar="true|false")
                group.add_argument(f"--no_{key}", dest=key, action="store_false", help=argparse.SUPPRESS)
            else:
                group.add_argument(f"--{key}", type=_flag_value(key, f.type), help=text,
                                   metavar=f.type.__name__.upper())
    return parser


def unknown_setting(key, parser):
    """The error for a key `cls` does not have: the closest setting, when one is close."""
    close = difflib.get_close_matches(key, list(parser.field_types), n=1)
    hint = f": did you mean --{close[0]}?" if close else ""
    return f"unknown setting {key!r} for {parser.prog}{hint} (see --help)"


def parse_args(cls, argv=None, defaults=None, demo=None):
    """Build `cls` from command-line flags (see build_parser), checking every key, type and
    choice. `defaults` replaces the dataclass defaults of some keys (the demo's settings);
    `demo` only shows the demo's values in --help."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(cls, defaults, demo)
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        key = unknown[0].lstrip("-").split("=", 1)[0]
        raise SettingsError(unknown_setting(key, parser) if unknown[0].startswith("--")
                            else f"unexpected argument {unknown[0]!r}: settings are --key value or --key=value")
    return make(cls, **{**(defaults or {}), **vars(namespace)})


def _finite(v):
    return math.isfinite(v)


# what each numeric setting must be: (test, the words of the error)
RANGES = {
    "max_length": (lambda v: v >= 1, "at least 1"),
    "global_batch_size": (lambda v: v >= 1, "at least 1"),
    "micro_batch_size": (lambda v: v >= 1, "at least 1"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "epochs": (lambda v: v >= 1, "at least 1"),
    "max_steps": (lambda v: v >= 0, "0 (no limit) or more"),
    "lr": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "warmup_steps": (lambda v: v >= 0, "0 or more"),
    "weight_decay": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "grad_clip": (lambda v: _finite(v) and v >= 0, "a finite number >= 0 (0 = off)"),
    "margin": (_finite, "a finite number"),
    "center_rewards_coefficient": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "log_every": (lambda v: v >= 1, "at least 1"),
    "save_every": (lambda v: v >= 0, "0 (only at the end) or more"),
    "threshold": (lambda v: 0 <= v <= 1, "a probability, in [0, 1]"),
    "tau_high": (lambda v: 0 <= v <= 1, "a probability, in [0, 1]"),
    "tau_low": (lambda v: 0 <= v <= 1, "a probability, in [0, 1]"),
    "tau_delta": (lambda v: 0 <= v <= 1, "a probability difference, in [0, 1]"),
    "status_min_count": (lambda v: v >= 0, "0 or more"),
    "status_min_fraction": (lambda v: 0 <= v <= 1, "a fraction, in [0, 1]"),
    "labeled_fraction": (lambda v: 0 <= v < 1, "a fraction in [0, 1): the rest becomes the pool"),
    "rounds": (lambda v: v >= 0, "0 or more"),
    "lora_r": (lambda v: v >= 1, "at least 1"),
    "lora_alpha": (lambda v: v >= 1, "at least 1"),
    "lora_dropout": (lambda v: 0 <= v < 1, "a probability, in [0, 1)"),
    "limit": (lambda v: v >= 0, "0 (all) or more"),
    "preview": (lambda v: v >= 0, "0 (off) or more"),
    "dist_timeout_s": (lambda v: v >= 1, "at least 1 second"),
    "temperature": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "calibration_pairs": (lambda v: v >= 1, "at least 1"),
}


def make(cls, **values):
    """Build settings in code (tests, the self-training loop), with the same checks as flags."""
    cfg = cls(**values)
    for key, allowed in {**CHOICES, **getattr(cls, "choices", {})}.items():
        if hasattr(cfg, key) and getattr(cfg, key) not in allowed:
            raise SettingsError(f"--{key}={getattr(cfg, key)!r}: expected one of {', '.join(allowed)}")
    for key, (ok, what) in RANGES.items():
        if key == "max_length" and cls in (LabelSettings, EvalSettings) and cfg.max_length == 0:
            continue  # the model's own: resolved when the model is known (modeling.resolve_max_length)
        if hasattr(cfg, key) and not ok(getattr(cfg, key)):
            raise SettingsError(f"--{key}={getattr(cfg, key)!r}: must be {what}")
    if hasattr(cfg, "tau_low") and cfg.tau_low > cfg.tau_high:
        raise SettingsError(f"--tau_low={cfg.tau_low} is above --tau_high={cfg.tau_high}: status 1 could never be met")
    if getattr(cfg, "weights_dtype", "fp32") != "fp32":
        if not cfg.lora:
            raise SettingsError(f"--weights_dtype={cfg.weights_dtype} stores the frozen weights in {cfg.weights_dtype}: "
                                "without --lora every weight trains, and trainable weights stay fp32")
        if cfg.fsdp:
            raise SettingsError(f"--weights_dtype={cfg.weights_dtype} is for DDP: under --fsdp each GPU holds only its "
                                "shard of the frozen weights, and computes in bf16 on a GPU that has it")
    if getattr(cfg, "fsdp", False) and cfg.dtype == "fp16":
        raise SettingsError("--dtype=fp16 is not supported with --fsdp: its loss scaler would skip a step on one rank "
                            "and not on another when only some shards overflow; use --dtype=bf16 (or fp32)")
    if getattr(cfg, "out_dir", None) == "":
        raise SettingsError("--out_dir is empty: name the run's folder")
    if getattr(cfg, "center_rewards_coefficient", 0) and cfg.model_type == "pm":
        raise SettingsError("--center_rewards_coefficient centres a scalar model's rewards: it needs --model_type=rm")
    return cfg


def to_dict(cfg):
    return dataclasses.asdict(cfg)
