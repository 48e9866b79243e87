"""--fsdp=true under torchrun on the CPU (gloo, FSDP2): the same training as one process and
as DDP, a saved model that plain transformers loads, the self-training loop with uneven
scoring shards, and a kill resumed to the same weights (issue: the papers' scale, first part)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from conftest import ROOT, free_port, write_jsonl
from selfrm.encoding import Encoder
from selfrm.formats import load_pairs

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # 2 ranks sum gradients in another order than 1 process


def torchrun(args, port, ranks=2, script="train.py", **kwargs):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                           f"--master_port={port}", script, *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, **kwargs)


def losses(out_dir):
    return [json.loads(line)["loss"] for line in open(os.path.join(out_dir, "train_log.jsonl"))]


def test_fsdp_trains_like_ddp_and_one_process_and_saves_a_plain_model(tmp_path, toy_files, rm_folder):
    train_file, eval_file = toy_files
    args = [f"--model={rm_folder}", "--model_type=rm", f"--train_file={train_file}", f"--eval_file={eval_file}",
            "--max_steps=4", "--global_batch_size=16", "--micro_batch_size=4", "--lr=2e-3", "--warmup_steps=1",
            "--log_every=1"]
    subprocess.run([sys.executable, "train.py", *args, f"--out_dir={tmp_path / 'one'}"], cwd=ROOT, env=ENV, check=True,
                   capture_output=True)
    for name, extra, port in (("ddp", [], 29571), ("fsdp", ["--fsdp=true"], 29572)):
        done = torchrun(args + extra + [f"--out_dir={tmp_path / name}"], port)
        assert done.returncode == 0, done.stderr[-3000:]
    one = losses(tmp_path / "one")
    assert len(one) == 4
    for name in ("ddp", "fsdp"):
        np.testing.assert_allclose(losses(tmp_path / name), one, **TOLERANCE)
        ref, got = load_file(tmp_path / "one" / "model" / "model.safetensors"), load_file(tmp_path / name / "model" / "model.safetensors")
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], **TOLERANCE)
    # the FSDP run's model, loaded by plain transformers, scores the eval pairs as the sharded model did
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    folder = tmp_path / "fsdp" / "model"
    hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    pairs = load_pairs(eval_file)
    ids = Encoder(tok, "rm", 512).encode_score([p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs])
    with torch.no_grad():
        reward = lambda seq: hf(input_ids=torch.tensor([seq])).logits[0, 0].item()
        accuracy = np.mean([reward(c) > reward(r) for c, r in ids])
    manifest = json.load(open(tmp_path / "fsdp" / "manifest.json"))
    assert accuracy == pytest.approx(manifest["rounds"][0]["eval_accuracy"], abs=1e-9)


def test_fsdp_self_training_loop_with_uneven_scoring_shards(tmp_path, pm_folder, loop_files):
    """The pool (81 pairs in batches of 40) gives rank 0 two scoring batches and rank 1 one:
    under FSDP every forward is a collective, so rank 1 must run an idle one."""
    lab, pool, ev = loop_files
    rows = [json.loads(line) for line in open(pool)] + [json.loads(open(pool).readline())]
    pool81 = write_jsonl(tmp_path / "pool81.jsonl", rows)
    args = [f"--model={pm_folder}", f"--train_file={lab}", f"--unlabeled_file={pool81}", f"--eval_file={ev}", "--rounds=2",
            "--threshold=0.5", "--global_batch_size=16", "--micro_batch_size=8", "--lr=2e-3", "--warmup_steps=1",
            "--batch_size=40"]
    subprocess.run([sys.executable, "train.py", *args, f"--out_dir={tmp_path / 'one'}"], cwd=ROOT, env=ENV, check=True,
                   capture_output=True)
    done = torchrun(args + ["--fsdp=true", f"--out_dir={tmp_path / 'fsdp'}"], 29573, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rounds = lambda name: [(r["round"], r.get("kept"), r.get("eval_accuracy"))
                           for r in json.load(open(tmp_path / name / "manifest.json"))["rounds"]]
    assert rounds("fsdp") == rounds("one") and len(rounds("one")) == 3


def descendants(pid):
    """Every process below `pid` (from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@pytest.mark.parametrize("lora", [False, True])
def test_a_killed_fsdp_run_resumes_to_the_same_weights(tmp_path, toy_files, pm_folder, lora):
    args = [f"--model={pm_folder}", f"--train_file={toy_files[0]}", "--epochs=4", "--save_every=5",
            "--global_batch_size=16", "--micro_batch_size=8", "--lr=2e-3", "--fsdp=true", f"--lora={lora}"]
    straight = torchrun(args + [f"--out_dir={tmp_path / 'straight'}"], 29574)
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "killed"
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29575",
                                 "train.py", *args, f"--out_dir={out}"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoint" / "state.pt").exists() and time.time() < deadline and launcher.poll() is None:
        time.sleep(0.05)
    for pid in descendants(launcher.pid) + [launcher.pid]:  # both ranks (torchrun gives them their own group), then it
        os.kill(pid, signal.SIGKILL)
    launcher.wait()
    assert not (out / "model").exists(), "the run finished before the kill: make it longer"
    # the checkpoint is sharded: one file per rank, written by that rank; no gathered weights
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    shards = out / "checkpoint" / state["shards"]
    assert "model" not in state and "optimizer" not in state
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(os.listdir(shards))
    assert [n for n in os.listdir(out / "checkpoint") if n.startswith("shards-")] == [state["shards"]]
    # only trainable weights are checkpointed: under LoRA the adapters, not the frozen base
    saved = [k for k in FileSystemReader(str(shards)).read_metadata().state_dict_metadata if k.startswith("model.")]
    assert len(saved) == (8 if lora else 21) and all(("lora_" in k) == lora for k in saved), saved
    resumed = torchrun(args + [f"--out_dir={out}"], 29576)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    ref, got = load_file(tmp_path / "straight" / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_lora_under_fsdp_trains_like_one_process_and_saves_merged_or_adapter(tmp_path, toy_files, pm_folder, rm_folder):
    """pm: the merged model (plain HF keys), with gradient checkpointing in the sharded blocks;
    rm: the adapter and peft's copy of the score head."""
    train_file, eval_file = toy_files
    common = [f"--train_file={train_file}", "--max_steps=4", "--global_batch_size=16", "--micro_batch_size=4",
              "--lr=5e-3", "--warmup_steps=1", "--log_every=1", "--lora=true", "--lora_dropout=0"]
    for kind, extra, weights, port in (("pm", [f"--model={pm_folder}", "--gradient_checkpointing=true"],
                                        "model.safetensors", 29577),
                                       ("rm", [f"--model={rm_folder}", "--model_type=rm", "--save_adapter_only=true"],
                                        "adapter_model.safetensors", 29578)):
        one, fsdp = tmp_path / f"{kind}-one", tmp_path / f"{kind}-fsdp"
        subprocess.run([sys.executable, "train.py", *common, *extra, f"--out_dir={one}"], cwd=ROOT, env=ENV,
                       check=True, capture_output=True)
        done = torchrun(common + extra + ["--fsdp=true", f"--out_dir={fsdp}"], port)
        assert done.returncode == 0, done.stderr[-3000:]
        np.testing.assert_allclose(losses(fsdp), losses(one), **TOLERANCE)
        ref, got = load_file(one / "model" / weights), load_file(fsdp / "model" / weights)
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], **TOLERANCE)
        if kind == "pm":  # merged: the base model's own keys, and the adapters' update is in the weights
            base = load_file(os.path.join(pm_folder, "model.safetensors"))
            assert got.keys() == base.keys()
            assert not torch.allclose(got["model.layers.0.self_attn.q_proj.weight"],
                                      base["model.layers.0.self_attn.q_proj.weight"])
        else:
            assert any("lora_A" in k for k in got) and any(k.endswith("score.weight") for k in got)


COUNTING = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
import torch
from transformers.models.llama import modeling_llama
import train

calls = []
real = modeling_llama.LlamaMLP.forward

def counting(self, x):  # counted inside forward: a checkpoint's recompute runs no module hooks
    calls.append(torch.is_grad_enabled())
    return real(self, x)

modeling_llama.LlamaMLP.forward = counting
train.main(train.settings_from_argv(sys.argv[3:]))
with open(os.path.join(sys.argv[2], f"calls-{os.environ['RANK']}.json"), "w") as f:
    json.dump(calls, f)
"""


@pytest.mark.parametrize("checkpointing", [False, True])
def test_checkpointing_recomputes_inside_the_sharded_blocks(tmp_path, toy_files, pm_folder, checkpointing):
    """FSDP + LoRA: each rank runs each of the 2 decoder layers once per micro-batch forward and,
    with --gradient_checkpointing, once more in the backward (the recompute)."""
    script = tmp_path / "counting.py"
    script.write_text(COUNTING)
    args = [f"--model={pm_folder}", f"--train_file={toy_files[0]}", "--max_steps=2", "--global_batch_size=16",
            "--micro_batch_size=4", "--fsdp=true", "--lora=true", f"--gradient_checkpointing={checkpointing}",
            f"--out_dir={tmp_path / 'o'}"]
    done = torchrun([ROOT, str(tmp_path), *args], 29579, script=str(script))
    assert done.returncode == 0, done.stderr[-3000:]
    forwards = 2 * 2 * 2  # per rank: 2 steps x 2 micro-batches of 4 (8 pairs of the 16) x 2 layers
    for rank in (0, 1):
        calls = json.load(open(tmp_path / f"calls-{rank}.json"))
        assert calls.count(True) == forwards * (2 if checkpointing else 1) and calls.count(False) == 0


ACCUMULATING = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
import torch
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM
from selfrm import dist, trainer
from selfrm.modeling import PreferenceModel
from selfrm.settings import TrainSettings, make

def peak_rss():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) * 1024

world = dist.compute_init()
torch.manual_seed(0)
# many small blocks, short sequences: the gradients, not one block's transients or the activations, set the peak
config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=16,
                     num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
cfg = make(TrainSettings, fsdp=True, dtype="fp32", micro_batch_size=1, lr=1e-3)
s = trainer.set_up(cfg, PreferenceModel(LlamaForCausalLM(config)), type("T", (), {"pad_token_id": 0})(), world,
                   {"A": 5, "B": 6})
held = []  # at each micro-step of the 4: what each parameter holds as .grad from the micro-steps before
real_sync = trainer.gradient_sync

def size(t):
    return 0 if t is None else (t.to_local() if isinstance(t, DTensor) else t).numel()

def recording(model, last):
    held.append([[type(p.grad).__name__, size(p.grad), size(p), p.numel()] for p in s.raw_model.parameters()])
    return real_sync(model, last)

trainer.gradient_sync = recording
pairs = torch.randint(7, 512, (8, 8), generator=torch.Generator().manual_seed(1)).tolist()
examples = [{"input_ids": ids, "label": 5} for ids in pairs]
peaks = {}
for step, k in enumerate((1, 1, 4)):  # the first step allocates AdamW's state
    batch = examples[:2 * k]
    held.clear()
    open("/proc/self/clear_refs", "w").write("5")  # the peak RSS starts again from the RSS now
    start = peak_rss()
    trainer.backward_global_batch(s, [[e] for e in batch[world.rank::2]], len(batch))
    trainer.optimizer_step(s, cfg, step, 10)
    peaks[k] = peak_rss() - start
grad_bytes = 4 * sum(p.numel() for p in s.raw_model.parameters())
with open(os.path.join(sys.argv[2], f"rank-{world.rank}.json"), "w") as f:
    json.dump({"peaks": peaks, "held": held, "grad_bytes": grad_bytes}, f)
dist.compute_cleanup()
dist.leave(0)
"""


def test_fsdp_accumulates_sharded_gradients_and_its_peak_does_not_grow_with_micro_steps(tmp_path):
    """Between the micro-steps of one optimizer step each rank holds its shard of the gradients
    (a DTensor of half the parameter's elements on 2 ranks), not the whole fp32 gradient: a
    step of 4 micro-steps peaks within a quarter of the gradient's bytes of a step of 1 (holding
    the whole gradient would add about half of them: the other rank's shard)."""
    script = tmp_path / "accumulating.py"
    script.write_text(ACCUMULATING)
    env = {**ENV, "MALLOC_MMAP_THRESHOLD_": "65536"}  # big tensors are mmapped, so a free lowers the RSS at once
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                           str(script), ROOT, str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        result = json.load(open(tmp_path / f"rank-{rank}.json"))
        growth = result["peaks"]["4"] - result["peaks"]["1"]
        assert growth < 0.25 * result["grad_bytes"], (rank, result["peaks"], result["grad_bytes"])
        assert len(result["held"]) == 4
        for grads in result["held"][1:]:  # before micro-steps 2, 3 and 4
            assert {kind for kind, *_ in grads} == {"DTensor"}, f"held between micro-steps: {grads[:2]}"
            assert all(local == shard for _, local, shard, _ in grads)
            assert sum(local for _, local, _, _ in grads) <= 0.51 * sum(full for *_, full in grads)
