"""The papers' flagship run, scaled down: checkpoints whose config says bf16 (Llama-3 with GQA and
llama3 rope scaling, Gemma-2 with soft-capping, embed_scale and a sliding window, Mistral, Qwen2),
FSDP on ranks that get uneven micro-batches, kills between two renames, preemption signals, and
a self-training run resumed to exactly where an uninterrupted one ends."""
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

import train
from conftest import ROOT, free_port, write_jsonl
from selfrm import rundir, steps, toy
from selfrm.encoding import Encoder, keep_lengths
from selfrm.formats import load_pairs
from selfrm.dist import Dist
from selfrm.modeling import load_model, save_model
from selfrm.settings import EvalSettings, InputError, LabelSettings, SettingsError, TrainSettings, make

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # 2 ranks sum gradients in another order than 1 process
ARCHS = ("llama3", "gemma2", "mistral", "qwen2")


def run(args, ranks=1, script="train.py", **kwargs):
    launch = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                 f"--nproc_per_node={ranks}", f"--master_port={free_port()}"]
    return subprocess.run([*launch, script, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, **kwargs)


def losses(out_dir):
    return [json.loads(line)["loss"] for line in open(os.path.join(out_dir, "train_log.jsonl"))]


def weights(folder, name="model.safetensors"):
    return load_file(os.path.join(folder, name))


def assert_same_weights(got, ref, **tolerance):
    assert got.keys() == ref.keys()
    for k in ref:
        if tolerance:
            torch.testing.assert_close(got[k], ref[k], **tolerance)
        else:
            assert torch.equal(got[k], ref[k]), k


# ----------------------------------------------------------------------------- loading (point 1)

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["pm", "rm"])
def test_every_rank_builds_fp32_whatever_the_config_says(real_like, arch, kind):
    """Rank 0 loads the bf16 checkpoint as fp32; a meta-device rank (FSDP) builds the same
    modules with the same dtypes, buffers included (Gemma's embed_scale), not the config's bf16."""
    folder = real_like(arch, kind)
    cfg = make(TrainSettings, model=folder, model_type=kind)
    loaded, _ = load_model(cfg)
    meta, _ = load_model(cfg, meta=True)
    full = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    empty = dict(meta.named_parameters()) | dict(meta.named_buffers())
    assert full.keys() == empty.keys()
    assert {n: t.dtype for n, t in empty.items()} == {n: t.dtype for n, t in full.items()}
    assert {t.dtype for t in loaded.parameters()} == {torch.float32}
    # the values are the checkpoint's (bf16 numbers, widened exactly)
    on_disk = weights(folder)
    name = next(k for k in on_disk if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert torch.equal(dict(loaded.hf.named_parameters())[name], on_disk[name].float())
    # saved and loaded again: the same fp32 weights
    out = os.path.join(str(real_like(arch, kind)) + "-saved-" + kind)
    save_model(loaded, _, out, {"model_type": kind})
    again, _ = load_model(cfg, out)
    assert_same_weights(dict(again.state_dict()), dict(loaded.state_dict()))


def test_a_meta_rank_builds_a_lora_adapter_folder_like_rank_0(tmp_path, real_like):
    """--fsdp with an adapter folder as the source (--init_from=previous, --save_adapter_only):
    the meta ranks build base + the same adapters, trainable alike, from adapter_config.json."""
    from selfrm.modeling import add_lora
    folder = real_like("llama3", "rm")
    cfg = make(TrainSettings, model=folder, model_type="rm", lora=True, save_adapter_only=True)
    model, tokenizer = load_model(cfg)
    add_lora(model, cfg)
    save_model(model, tokenizer, str(tmp_path / "adapter"), {"model_type": "rm"}, adapter_only=True)
    loaded, _ = load_model(cfg, str(tmp_path / "adapter"))
    meta, _ = load_model(cfg, str(tmp_path / "adapter"), meta=True)
    describe = lambda m: {n: (p.dtype, p.requires_grad) for n, p in m.named_parameters()}
    assert describe(meta) == describe(loaded)
    assert any("lora_A" in n and p.requires_grad for n, p in meta.named_parameters())


@pytest.mark.parametrize("dtype,expected", [("bf16", torch.bfloat16), ("fp32", torch.float32),
                                            ("auto", torch.float32)])  # auto: fp32 on a CPU
def test_label_and_evaluate_read_the_weights_in_the_compute_dtype_onto_the_device(tmp_path, real_like, loop_files,
                                                                                  monkeypatch, dtype, expected):
    """Scoring reads a bf16 checkpoint in the compute dtype, each tensor put on the rank's device as
    it is read (device_map), not as an fp32 model on the CPU moved after; training still reads fp32."""
    import evaluate as evaluate_script
    import label as label_script
    from selfrm import modeling, scoring
    _, pool, ev = loop_files
    folder = real_like("llama3", "pm")
    reads, scored = [], []
    real_read, real_score = modeling.from_pretrained, scoring.score

    def reading(auto, source, **kwargs):
        if "dtype" in kwargs:  # a model, not a tokenizer
            reads.append((kwargs["dtype"], kwargs.get("device_map")))
        return real_read(auto, source, **kwargs)

    def scoring_with(cfg, world, model, *args):
        scored.append({(p.dtype, p.device) for p in model.parameters()})
        return real_score(cfg, world, model, *args)
    monkeypatch.setattr(modeling, "from_pretrained", reading)
    monkeypatch.setattr(scoring, "score", scoring_with)
    label_script.main(make(LabelSettings, model=folder, unlabeled_file=pool, out_file=str(tmp_path / "l.jsonl"),
                           dtype=dtype, max_length=64))
    evaluate_script.main(make(EvalSettings, model=folder, eval_file=ev, dtype=dtype, max_length=64))
    assert reads == [(expected, torch.device("cpu"))] * 2
    assert scored == [{(expected, torch.device("cpu"))}] * 2
    reads.clear()
    load_model(make(TrainSettings, model=folder, dtype=dtype))  # training: fp32 master weights, as before
    assert reads == [(torch.float32, None)]


LOAD_PEAK = """
import gc, json, sys, threading, time
sys.path.insert(0, sys.argv[1])
from selfrm import steps
from selfrm.dist import Dist
from selfrm.settings import TrainSettings, make

def private_bytes():  # the process's own memory: the checkpoint's file pages are the page cache's, shared
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("RssAnon")).split()[1]) * 1024

cfg = make(TrainSettings, model=sys.argv[2], dtype=sys.argv[3])  # a round scores the model it trained
steps.scoring_model(cfg, Dist(), cfg.model)  # imports and caches warm up; then it is freed
gc.collect()
before, peak, done = private_bytes(), [0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], private_bytes() - before)
        time.sleep(0.0002)
thread = threading.Thread(target=sample)
thread.start()
model, _ = steps.scoring_model(cfg, Dist(), cfg.model)
done.set()
thread.join()
print(json.dumps({"peak": max(peak[0], private_bytes() - before), "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
                  "fp32_bytes": 4 * sum(p.numel() for p in model.parameters())}))
"""


def test_a_bf16_scoring_load_builds_no_fp32_copy(tmp_path):
    """An 11.9M-parameter Llama saved in bf16, as hub checkpoints are (48 MB in fp32): scoring with
    --dtype=bf16 loads it without an fp32 copy (the process's private memory peaks under a
    quarter of the fp32 model's bytes: the weights are the file's pages, shared), while
    --dtype=fp32 builds the whole fp32 model."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    tokenizer = toy.build_tokenizer(chat=True)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024, num_hidden_layers=12,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    env = {**ENV, "MALLOC_MMAP_THRESHOLD_": "65536"}  # big tensors are mmapped, so a free lowers the RSS at once
    loads = {}
    for dtype in ("bf16", "fp32"):
        done = subprocess.run([sys.executable, "-c", LOAD_PEAK, ROOT, str(tmp_path / "m"), dtype], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        loads[dtype] = json.loads(done.stdout.strip().splitlines()[-1])
    fp32_bytes = loads["fp32"]["fp32_bytes"]
    assert loads["bf16"]["peak"] < 0.25 * fp32_bytes, loads
    assert loads["fp32"]["peak"] > 0.9 * fp32_bytes, loads  # the measurement sees a whole fp32 model when there is one
    assert loads["bf16"]["dtypes"] == ["torch.bfloat16"] and loads["fp32"]["dtypes"] == ["torch.float32"]


# ----------------------------------------------------------------------------- FSDP == DDP == one process (1, 2, 3, 5)

KILL_BETWEEN_RENAMES = """
import os, sys
sys.path.insert(0, sys.argv[1])
from selfrm import checkpoint
import train

real = checkpoint.atomic_path
calls = []

def dying(path):  # a kill after shards-00000002 is renamed into place, before state.pt names it
    if path.endswith("state.pt"):
        calls.append(path)
        if len(calls) == 2 and os.environ["RANK"] == "0":
            os._exit(9)
    return real(path)

checkpoint.atomic_path = dying
train.main(train.settings_from_argv(sys.argv[2:]))
"""


@pytest.mark.parametrize("arch,kind", [("llama3", "pm"), ("gemma2", "rm")])
def test_fsdp_on_bf16_checkpoints_with_uneven_ranks_trains_like_ddp_and_one_process(tmp_path, real_like, toy_files,
                                                                                       arch, kind):
    """9 pairs a step on 2 ranks with micro-batches of 1: rank 0 runs 5 micro-steps, rank 1 4 (plus
    one of weight 0 under FSDP). Losses of every step and the final weights agree."""
    args = [f"--model={real_like(arch, kind)}", f"--model_type={kind}", f"--train_file={toy_files[0]}",
            "--max_steps=3", "--global_batch_size=9", "--micro_batch_size=1", "--lr=2e-3", "--warmup_steps=1",
            "--log_every=1", "--save_every=1"]
    one = run(args + [f"--out_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp=true"])):
        done = run(args + extra + [f"--out_dir={tmp_path / name}"], ranks=2, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    reference = losses(tmp_path / "one")
    assert len(reference) == 3
    for name in ("ddp", "fsdp"):
        np.testing.assert_allclose(losses(tmp_path / name), reference, **TOLERANCE)
        assert_same_weights(weights(tmp_path / name / "model"), weights(tmp_path / "one" / "model"), **TOLERANCE)
        assert {t.dtype for t in weights(tmp_path / name / "model").values()} == {torch.float32}
    if kind == "rm":  # the anchor: the first step's loss is -log sigmoid(r_c - r_r) over its 9 pairs, by hand
        assert reference[0] == pytest.approx(first_rm_loss(real_like(arch, kind), toy_files[0], 9), rel=1e-5)
    if arch != "llama3":
        return
    # a kill between renaming shards-00000002 into place and replacing state.pt: the rerun finishes
    script = tmp_path / "dying.py"
    script.write_text(KILL_BETWEEN_RENAMES)
    out = tmp_path / "killed"
    killed = run([ROOT, *args, "--fsdp=true", f"--out_dir={out}"], ranks=2, script=str(script), timeout=600)
    assert killed.returncode != 0
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert state["shards"] == "shards-00000001" and (out / "checkpoint" / "shards-00000002").is_dir()
    resumed = run(args + ["--fsdp=true", f"--out_dir={out}"], ranks=2, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(weights(out / "model"), weights(tmp_path / "fsdp" / "model"))


def first_rm_loss(folder, train_file, n):
    """The mean pairwise loss of the first global batch of n pairs, from plain transformers."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from selfrm.trainer import global_batches
    hf = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    pairs = load_pairs(train_file)
    ids = Encoder(AutoTokenizer.from_pretrained(folder), "rm", 512).encode_score(
        [p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs])
    cfg = make(TrainSettings, global_batch_size=n)
    batch = global_batches([max(map(len, i)) for i in ids], cfg, Dist(), 0)[0]
    with torch.no_grad():
        reward = lambda seq: hf(input_ids=torch.tensor([seq])).logits[0, 0].double().item()
        return float(np.mean([np.log1p(np.exp(-(reward(ids[i][0]) - reward(ids[i][1])))) for i in batch]))


POLICY = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from transformers.models.llama import modeling_llama
import train

seen = set()
real = modeling_llama.LlamaMLP.forward

def recording(self, x):
    seen.add(str(self.gate_proj.weight.dtype))
    return real(self, x)

modeling_llama.LlamaMLP.forward = recording
train.main(train.settings_from_argv(sys.argv[3:]))
with open(os.path.join(sys.argv[2], f"dtypes-{os.environ['RANK']}.json"), "w") as f:
    json.dump(sorted(seen), f)
"""


@pytest.mark.parametrize("dtype,expected", [("bf16", "torch.bfloat16"), ("fp32", "torch.float32")])
def test_fsdp_computes_in_the_dtype_that_dtype_names(tmp_path, real_like, toy_files, dtype, expected):
    """The FSDP mixed-precision policy follows --dtype (it was bf16 on any GPU that had it)."""
    script = tmp_path / "policy.py"
    script.write_text(POLICY)
    args = [f"--model={real_like('llama3', 'pm')}", f"--train_file={toy_files[0]}", "--max_steps=1",
            "--global_batch_size=4", "--micro_batch_size=2", "--fsdp=true", f"--dtype={dtype}",
            f"--out_dir={tmp_path / 'o'}"]
    done = run([ROOT, str(tmp_path), *args], ranks=2, script=str(script), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert json.load(open(tmp_path / f"dtypes-{rank}.json")) == [expected]
    # the master weights stay fp32 either way
    assert {t.dtype for t in weights(tmp_path / "o" / "model").values()} == {torch.float32}


def test_fp16_under_fsdp_is_refused_in_one_line():
    with pytest.raises(SettingsError, match="--dtype=fp16 is not supported with --fsdp"):
        make(TrainSettings, fsdp=True, dtype="fp16")


def test_fsdp_self_training_from_a_saved_adapter(tmp_path, real_like, loop_files):
    """--lora --save_adapter_only --init_from=previous under FSDP: from round 1 on the source is
    an adapter folder (the meta ranks failed on it); the run ends as one process's does."""
    lab, pool, ev = loop_files
    args = [f"--model={real_like('llama3', 'rm')}", "--model_type=rm", f"--train_file={lab}",
            f"--unlabeled_file={pool}", f"--eval_file={ev}", "--rounds=1", "--filter=confidence", "--threshold=0.5",
            "--lora=true", "--lora_dropout=0", "--save_adapter_only=true", "--init_from=previous",
            "--global_batch_size=16", "--micro_batch_size=8", "--lr=5e-3", "--warmup_steps=1"]
    one = run(args + [f"--out_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    done = run(args + ["--fsdp=true", f"--out_dir={tmp_path / 'fsdp'}"], ranks=2, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rounds = lambda name: json.load(open(tmp_path / name / "manifest.json"))["rounds"]
    assert [r["init_model"] for r in rounds("fsdp")] == [args[0].split("=", 1)[1], "round_0/model"]
    for got, ref in zip(rounds("fsdp"), rounds("one")):
        assert got["kept"] == ref["kept"] if "kept" in ref else True
        assert got["eval_accuracy"] == pytest.approx(ref["eval_accuracy"], abs=1 / 32 + 1e-9)
    assert_same_weights(weights(tmp_path / "fsdp" / "round_1" / "model", "adapter_model.safetensors"),
                        weights(tmp_path / "one" / "round_1" / "model", "adapter_model.safetensors"), rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- exact self-training resume (6)

def test_a_resumed_self_training_run_ends_where_an_uninterrupted_one_does(tmp_path, real_like, loop_files,
                                                                          monkeypatch):
    """--lora --weights_dtype=bf16 on a bf16 Llama-3: killed before round 1 labels (round 0
    finished), then killed after round 1 saved its model and before the manifest recorded it.
    The pool's probabilities, the manifest (train_loss, truncated, dropped included) and the
    final weights are those of the uninterrupted run, bit for bit."""
    lab, pool, ev = loop_files
    settings = dict(model=real_like("llama3", "pm"), train_file=lab, unlabeled_file=pool, eval_file=ev, rounds=2,
                    threshold=0.55, lora=True, weights_dtype="bf16", global_batch_size=16, micro_batch_size=8,
                    lr=5e-3, warmup_steps=1, max_length=24)
    import train as train_script

    def main(out_dir):
        return train_script.main(make(TrainSettings, **settings, out_dir=str(out_dir)))

    main(tmp_path / "straight")
    real_relabel, real_record = steps.relabel, rundir.RunDir.record

    def killed_relabel(*args, **kwargs):
        raise KeyboardInterrupt("killed before round 1 labels")

    def killed_record(run, record):
        if record["round"] == 1:
            raise KeyboardInterrupt("killed before round 1 is recorded")
        return real_record(run, record)

    out = tmp_path / "killed"
    for patch in ((steps, "relabel", killed_relabel), (rundir.RunDir, "record", killed_record)):
        monkeypatch.setattr(*patch)
        with pytest.raises(KeyboardInterrupt):
            main(out)
        monkeypatch.setattr(steps, "relabel", real_relabel)
        monkeypatch.setattr(rundir.RunDir, "record", real_record)
    main(out)
    for t in (1, 2):
        straight = [json.loads(line) for line in open(tmp_path / "straight" / f"round_{t}" / "pool.jsonl")]
        resumed = [json.loads(line) for line in open(out / f"round_{t}" / "pool.jsonl")]
        assert [r["prob_a"] for r in resumed] == [r["prob_a"] for r in straight]
    drop_time = lambda m: [{k: v for k, v in r.items() if k != "seconds"} for r in m["rounds"]]
    ref, got = (json.load(open(p / "manifest.json")) for p in (tmp_path / "straight", out))
    assert drop_time(got) == drop_time(ref)
    assert got["rounds"][1]["train_loss"] is not None and got["rounds"][1]["truncated"] is not None
    assert got["rounds"][1]["truncated"] > 0  # max_length 24 cuts these 27-token pairs
    assert_same_weights(weights(out / "round_2" / "model"), weights(tmp_path / "straight" / "round_2" / "model"))


RECORDING_LOADS = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from selfrm import steps
import train

real_load = steps.load_model

def recording(cfg, source=None, tokenizer=None, meta=False, **kwargs):
    with open(os.path.join(sys.argv[2], f"loads-{os.environ['RANK']}.jsonl"), "a") as f:
        f.write(json.dumps({"source": source, "meta": meta}) + "\\n")
    return real_load(cfg, source, tokenizer, meta, **kwargs)

def killed(*args, **kwargs):  # a kill before round 1 labels its pool: round 0 finished
    os._exit(9)

steps.load_model = recording
if sys.argv[3] == "kill":
    steps.relabel = killed
train.main(train.settings_from_argv(sys.argv[4:]))
"""


@pytest.mark.parametrize("mode", [["--weights_dtype=bf16"], ["--fsdp=true"]], ids=["ddp-bf16-base", "fsdp"])
def test_2_ranks_resumed_after_round_0_end_where_an_uninterrupted_run_does(tmp_path, real_like, loop_files, mode):
    """LoRA on 2 ranks: under DDP only rank 0 merged the adapters in place and the base was bf16;
    under FSDP the model scored sharded in bf16-or-fp32 compute. Every rank now scores with the
    model loaded back from disk, as a resumed run does: the same pool probabilities and final
    weights, bit for bit. Under FSDP the other ranks load it on the meta device only."""
    lab, pool, ev = loop_files
    script = tmp_path / "recording.py"
    script.write_text(RECORDING_LOADS)
    args = [f"--model={real_like('llama3', 'pm')}", f"--train_file={lab}", f"--unlabeled_file={pool}",
            f"--eval_file={ev}", "--rounds=1", "--threshold=0.55", "--lora=true", "--global_batch_size=16",
            "--micro_batch_size=8", "--lr=5e-3", "--warmup_steps=1", "--max_length=24", *mode]
    straight, out = tmp_path / "straight", tmp_path / "resumed"
    for folder, what in ((straight, "go"), (out, "kill"), (out, "go")):
        logs = tmp_path / f"logs-{folder.name}-{what}"
        logs.mkdir()
        done = run([ROOT, str(logs), what, *args, f"--out_dir={folder}"], ranks=2, script=str(script), timeout=600)
        assert (done.returncode != 0) == (what == "kill"), done.stderr[-3000:]
    assert len(json.load(open(out / "manifest.json"))["rounds"]) == 2
    probs = lambda folder: [json.loads(line)["prob_a"] for line in open(folder / "round_1" / "pool.jsonl")]
    assert probs(out) == probs(straight)
    assert_same_weights(weights(out / "round_1" / "model"), weights(straight / "round_1" / "model"))
    if "--fsdp=true" in mode:  # rank 1 never reads a whole model into host memory
        loads = [json.loads(line) for line in open(tmp_path / "logs-straight-go" / "loads-1.jsonl")]
        assert len(loads) >= 3 and all(load["meta"] for load in loads)


# ----------------------------------------------------------------------------- scoring length (7)

def test_label_and_evaluate_score_at_the_length_the_model_was_trained_at(tmp_path, pm_folder, loop_files, capsys):
    import evaluate as evaluate_script
    import label as label_script
    lab, pool, ev = loop_files
    from selfrm.steps import train_run
    cfg = make(TrainSettings, model=pm_folder, train_file=lab, max_length=20, max_steps=1, global_batch_size=8,
               micro_batch_size=8, out_dir=str(tmp_path / "run"))
    train_run(cfg, Dist(), load_pairs(lab), cfg.out_dir, pm_folder)
    model = str(tmp_path / "run" / "model")
    metrics = evaluate_script.main(make(EvalSettings, model=model, eval_file=ev))
    assert metrics["max_length"] == 20 and metrics["truncated"] > 0
    assert "--max_length=20 (the length" in capsys.readouterr().out
    _, summary = label_script.main(make(LabelSettings, model=model, unlabeled_file=pool,
                                        out_file=str(tmp_path / "l.jsonl")))
    assert summary["truncated"] > 0
    # given explicitly, the flag wins; a model with no settings.json is scored at 512
    assert evaluate_script.main(make(EvalSettings, model=model, eval_file=ev, max_length=300))["max_length"] == 300
    assert evaluate_script.main(make(EvalSettings, model=pm_folder, eval_file=ev))["max_length"] == 512
    assert "the default: " in capsys.readouterr().out


# ----------------------------------------------------------------------------- the scalar model's cut (8)

def test_the_rule_on_numbers():
    """Balanced: every segment keeps min(its length, L) for the largest L that fits."""
    # one pm sequence: 10 template tokens, context 20, responses 6 and 2, 30 tokens: L = 12
    assert keep_lengths(20, [6, 2], [10], [[0, 1]], 30) == (12, [6, 2])
    # 16 tokens leave 6 for content: L = 2 (the context down to 6, then all three to 2)
    assert keep_lengths(20, [6, 2], [10], [[0, 1]], 16) == (2, [2, 2])
    # 7 for content: still L = 2 (L = 3 needs 8): one token unused, the segments stay level
    assert keep_lengths(20, [6, 2], [10], [[0, 1]], 17) == (2, [2, 2])
    # an rm pair, one response per sequence: the longer sequence decides the shared context cut
    assert keep_lengths(20, [6, 2], [5, 5], [[0], [1]], 25) == (14, [6, 2])
    assert keep_lengths(20, [9, 2], [5, 5], [[0], [1]], 10) == (2, [2, 2])
    assert keep_lengths(20, [9, 2], [5, 5], [[0], [1]], 6) is None  # not one token each
    assert keep_lengths(0, [9, 2], [5], [[0, 1]], 9) == (0, [2, 2])  # no context: the responses share it all


def test_both_sequences_of_a_scalar_pair_read_the_same_context():
    tok = toy.build_tokenizer()
    prompt = [{"role": "user", "content": " ".join(f"t{i}" for i in range(12))}]
    long, short = " ".join(f"w{i}" for i in range(1, 9)), "w20"
    full = Encoder(tok, "rm", 10_000).encode_score([prompt], [long], [short])[0]
    enc = Encoder(tok, "rm", len(full[0]) - 4)  # the chosen sequence is 4 tokens over: context 12 -> 8
    chosen, rejected = enc.encode_score([prompt], [long], [short])[0]
    context = lambda ids: [w for w in tok.convert_ids_to_tokens(ids) if w.startswith("t")]
    assert context(chosen) == context(rejected) == [f"t{i}" for i in range(4, 12)]
    assert [w for w in tok.convert_ids_to_tokens(chosen) if w.startswith("w")] == long.split()
    assert len(rejected) < len(full[1])  # cut although it fitted alone
    assert enc.truncated == 1


# ----------------------------------------------------------------------------- torch floor (9)

def test_an_old_torch_fails_at_import_with_one_line():
    code = "import torch; torch.__version__ = '2.5.1+cu121'; import selfrm"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: selfrm needs torch >= 2.6 (for torch.distributed.fsdp.fully_shard); this is torch 2.5.1+cu121: "
        "pip install 'torch>=2.6'"]
    assert "torch>=2.6" in open(os.path.join(ROOT, "requirements.txt")).read().split()


# ----------------------------------------------------------------------------- preemption (10)

SIGNAL_AT_STEP = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from selfrm import trainer
import train

real = trainer.lr_at

def signalling(step, total, cfg):  # the scheduler's notice arrives during step 3
    if step == 2:
        os.kill(os.getpid(), getattr(signal, sys.argv[2]))
    return real(step, total, cfg)

trainer.lr_at = signalling
from selfrm.settings import cli
cli(train.main, lambda: train.settings_from_argv(sys.argv[3:]))
"""


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_a_preempted_run_checkpoints_and_resumes_to_the_same_weights(tmp_path, pm_folder, toy_files, signame):
    args = [f"--model={pm_folder}", f"--train_file={toy_files[0]}", "--max_steps=6", "--global_batch_size=16",
            "--micro_batch_size=8", "--lr=2e-3", "--save_every=0", "--log_every=1"]
    straight = run(args + [f"--out_dir={tmp_path / 'straight'}"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    script = tmp_path / "preempting.py"
    script.write_text(SIGNAL_AT_STEP)
    out = tmp_path / "preempted"
    stopped = run([ROOT, signame, *args, f"--out_dir={out}"], script=str(script))
    assert stopped.returncode == 128 + getattr(signal, signame), stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"preempted: round 0: stopped by {signame} after step 3/6; checkpoint written to {out / 'checkpoint'}: "
        f"rerun the same command to resume")
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"] == 3
    assert not (out / "model").exists()
    resumed = run(args + [f"--out_dir={out}"])
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout + resumed.stderr
    assert_same_weights(weights(out / "model"), weights(tmp_path / "straight" / "model"))
    assert losses(out) == losses(tmp_path / "straight")


@pytest.mark.parametrize("mode", [[], ["--fsdp=true"]], ids=["ddp", "fsdp"])
def test_torchrun_forwards_sigterm_and_every_rank_checkpoints_the_same_step(tmp_path, pm_folder, toy_files, mode):
    args = [f"--model={pm_folder}", f"--train_file={toy_files[0]}", "--epochs=6", "--global_batch_size=16",
            "--micro_batch_size=8", "--lr=2e-3", "--save_every=0", "--log_every=1", *mode]
    straight = run(args + [f"--out_dir={tmp_path / 'straight'}"], ranks=2, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "preempted"
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                              f"--master_port={free_port()}", "train.py", *args, f"--out_dir={out}"], cwd=ROOT, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "train_log.jsonl").exists() and time.time() < deadline and agent.poll() is None:
        time.sleep(0.05)
    agent.send_signal(signal.SIGTERM)  # what Slurm or the kubelet does: the agent forwards it to every rank
    _, stderr = agent.communicate(timeout=120)
    assert agent.returncode != 0
    assert not (out / "model").exists(), "the run finished before the signal: make it longer"
    assert stderr.count("preempted: round 0: stopped by SIGTERM") == 2, stderr[-3000:]  # one line from each rank
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    step = state["step"]
    assert ("shards" in state) == ("--fsdp=true" in mode)
    assert step >= 1
    resumed = run(args + [f"--out_dir={out}"], ranks=2, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint'} at step {step}/" in resumed.stdout + resumed.stderr
    assert_same_weights(weights(out / "model"), weights(tmp_path / "straight" / "model"))


SIGNAL_WHILE_SCORING = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from selfrm import scoring
import {script} as script

real = scoring.pair_batch
def signalling(*args, **kwargs):  # the notice arrives while the second batch is scored
    signalling.calls += 1
    if signalling.calls == 2 and os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 only
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
signalling.calls = 0
scoring.pair_batch = signalling
from selfrm.settings import cli, parse_args, {settings}
cli(script.main, lambda: parse_args({settings}, sys.argv[2:]))
"""


@pytest.mark.parametrize("script,settings,flags", [
    ("label", "LabelSettings", ["--unlabeled_file={pool}", "--out_file={out}/l.jsonl"]),
    ("evaluate", "EvalSettings", ["--eval_file={pool_as_pairs}", "--out_file={out}/m.json",
                                  "--predictions_file={out}/p.jsonl"])])
def test_label_and_evaluate_stopped_by_sigterm_leave_no_output(tmp_path, pm_folder, loop_files, script, settings, flags):
    lab, pool, ev = loop_files
    out = tmp_path / "out"
    out.mkdir()
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(SIGNAL_WHILE_SCORING.replace("{script}", script).replace("{settings}", settings))
    args = [f.format(pool=pool, pool_as_pairs=lab, out=out) for f in flags]
    done = run([ROOT, f"--model={pm_folder}", "--batch_size=4", *args], script=str(wrapper))
    assert done.returncode == 143, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith("preempted: stopped by SIGTERM while scoring")
    assert os.listdir(out) == []
    # 2 ranks, the signal on rank 0 only: they agree, and both stop with the line, no traceback
    done = run([ROOT, f"--model={pm_folder}", "--batch_size=4", *args], ranks=2, script=str(wrapper), timeout=300)
    assert done.returncode != 0
    ranks = done.stderr.split("failed (exitcode")[0]  # what the ranks printed, before torchrun's own report
    assert ranks.count("preempted: stopped by SIGTERM while scoring") == 2 and "Traceback" not in ranks, ranks[-3000:]
    assert os.listdir(out) == []


# ----------------------------------------------------------------------------- exit codes (12)

def test_finished_torchrun_runs_exit_0_every_time(tmp_path, pm_folder, loop_files):
    """A 2-rank self-training run that finished exits 0 (it had aborted at teardown, SIGABRT,
    about once in seven FSDP runs, so torchrun reported a finished run as failed). Three FSDP
    runs and two DDP runs."""
    lab, pool, ev = loop_files
    args = [f"--model={pm_folder}", f"--train_file={lab}", f"--unlabeled_file={pool}", "--rounds=1",
            "--threshold=0.5", "--global_batch_size=16", "--micro_batch_size=8", "--lr=2e-3", "--warmup_steps=1"]
    for i, extra in enumerate([["--fsdp=true"]] * 3 + [[]] * 2):
        done = run(args + extra + [f"--out_dir={tmp_path / str(i)}"], ranks=2, timeout=600)
        assert done.returncode == 0, (i, done.stderr[-3000:])
        assert json.load(open(tmp_path / str(i) / "manifest.json"))["final_model"] == "round_1/model"


def test_a_tokenizer_that_makes_no_tokens_is_a_clear_error(real_like, tmp_path, toy_files):
    """transformers 5 picks the tokenizer class from the model type: the Qwen2 fixture's word-level
    files read through Qwen2Tokenizer give no tokens at all. Training must say so, not crash in a
    reshape of empty sequences."""
    folder = real_like("qwen2", "rm")
    cfg = make(TrainSettings, model=folder, model_type="rm", train_file=toy_files[0], out_dir=str(tmp_path / "run"),
               max_steps=1)
    with pytest.raises(InputError, match="Qwen2Tokenizer, the class transformers chose for this model.*no tokens"):
        train.main(cfg)
    assert not os.path.exists(tmp_path / "run")  # said before anything was written
