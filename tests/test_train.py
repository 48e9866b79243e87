"""train.py end to end: settings, bad input, save/reload, resume, DDP, learnability."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import kill_at_step, run_one_and_two_ranks, write_jsonl
from selfrm.formats import DataError, load_pairs
from selfrm.settings import SettingsError, TrainSettings, make, parse_args

FAST = dict(lr=2e-3, warmup_steps=2, global_batch_size=16, micro_batch_size=8, log_every=5)


def run(tmp_path, name, **overrides):
    cfg = make(TrainSettings, out_dir=str(tmp_path / name), **{**FAST, **overrides})
    return cfg, train.main(cfg)


def weights(out_dir):
    return load_file(os.path.join(out_dir, "model", "model.safetensors"))


# ----------------------------------------------------------------------------- settings

def test_settings_flags_config_file_and_errors(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"lr": 1e-4, "lora": True, "epochs": 2}))
    cfg = parse_args(TrainSettings, ["--model_type=rm", f"--config={config}", "--epochs=3", "--margin=0.5"])
    assert (cfg.model_type, cfg.lr, cfg.lora, cfg.epochs, cfg.margin) == ("rm", 1e-4, True, 3, 0.5)
    with pytest.raises(SettingsError, match="unknown setting 'learning_rate'"):
        parse_args(TrainSettings, ["--learning_rate=1"])
    with pytest.raises(SettingsError, match="--epochs: expected int, got 'two'"):
        parse_args(TrainSettings, ["--epochs=two"])
    with pytest.raises(SettingsError, match="--lora: expected true or false"):
        parse_args(TrainSettings, ["--lora=maybe"])
    with pytest.raises(SettingsError, match="--model_type='pairwise': expected one of pm, rm"):
        parse_args(TrainSettings, ["--model_type=pairwise"])
    config.write_text(json.dumps({"epochs": "2"}))
    with pytest.raises(SettingsError, match="epochs: expected int, got str"):
        parse_args(TrainSettings, [f"--config={config}"])


# ----------------------------------------------------------------------------- bad input

GOOD = {"prompt": "t1", "chosen": "w1", "rejected": "w2"}


@pytest.mark.parametrize("line, message", [
    ("{not json", r"bad\.jsonl:3: not valid JSON"),
    (json.dumps({"prompt": "t1", "chosen": "w1"}), r"bad\.jsonl:3: field 'rejected' is missing"),
    (json.dumps({**GOOD, "chosen": "  "}), r"bad\.jsonl:3: field 'chosen' is empty"),
    (json.dumps({**GOOD, "rejected": 5}), r"bad\.jsonl:3: field 'rejected' must be a string, got int"),
    (json.dumps({**GOOD, "prompt": [{"role": "bot", "content": "x"}]}), r"bad\.jsonl:3: field 'prompt\[0\]'"),
    (json.dumps({**GOOD, "prompt": []}), r"bad\.jsonl:3: field 'prompt' must be"),
    (json.dumps({**GOOD, "margin": "big"}), r"bad\.jsonl:3: field 'margin' must be a number"),
    (json.dumps([1, 2]), r"bad\.jsonl:3: expected a JSON object, got list"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        load_pairs(str(path))


def test_bad_rows_skip_reports_each_and_keeps_the_rest(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "chosen": ""}) + "\n" + json.dumps(GOOD) + "\n")
    assert len(load_pairs(str(path), bad_rows="skip")) == 2
    out = capsys.readouterr().out
    assert "bad.jsonl:2: field 'chosen' is empty" in out and "skipped 1 bad rows" in out


def test_bad_input_stops_before_training_and_writes_nothing(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) * 1 + "\n" + json.dumps({"prompt": "t1"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:2: field 'chosen' is missing"):
        train.main(make(TrainSettings, train_file=str(path), out_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_chat_rows_and_extra_fields_are_read(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
         "chosen": {"role": "assistant", "content": "c"}, "rejected": [{"role": "assistant", "content": "r"}],
         "margin": 1, "id": 7}])
    pair = load_pairs(path)[0]
    assert (pair.prompt[0]["role"], pair.chosen, pair.rejected, pair.margin, pair.extra) == ("system", "c", "r", 1.0, {"id": 7})


# ----------------------------------------------------------------------------- learning, saving

@pytest.mark.parametrize("kind", ["pm", "rm"])
def test_learns_the_toy_rule_and_saves_a_model_plain_transformers_loads(tmp_path, toy_files, pm_folder, rm_folder, kind):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from selfrm.steps import train_run
    from selfrm.dist import Dist
    train_file, eval_file = toy_files
    folder = pm_folder if kind == "pm" else rm_folder
    cfg, record = run(tmp_path, kind, model=folder, model_type=kind, train_file=train_file, eval_file=eval_file,
                      epochs=6, lr=3e-3, warmup_steps=5)
    assert record["eval_accuracy"] > 0.8, record  # chance is 0.5
    manifest = json.load(open(os.path.join(cfg.out_dir, "manifest.json")))
    assert manifest["final_model"] == "model" and manifest["rounds"][0]["eval_accuracy"] == record["eval_accuracy"]
    saved = json.load(open(os.path.join(cfg.out_dir, "model", "settings.json")))
    assert saved["model_type"] == kind and saved["lr"] == 3e-3
    # the in-memory trained model and plain transformers' reload score identically
    model, tok, _ = train_run(cfg, Dist(), load_pairs(train_file), cfg.out_dir, folder)
    plain = (AutoModelForCausalLM if kind == "pm" else AutoModelForSequenceClassification).from_pretrained(
        os.path.join(cfg.out_dir, "model"))
    ids = torch.tensor([tok.encode("[CONTEXT] t1 [RESPONSE A] w1 w2 [RESPONSE B] w3 w4")])
    with torch.no_grad():
        if kind == "pm":
            ours = model(ids, torch.ones_like(ids), torch.tensor([ids.shape[1] - 1]))
            theirs = plain(ids).logits[:, -1]
        else:
            ours, theirs = model(ids, torch.ones_like(ids)), plain(ids).logits[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_lora_rm_trains_the_score_head_and_saves_merged(tmp_path, toy_files, rm_folder):
    train_file, _ = toy_files
    cfg, _ = run(tmp_path, "lora", model=rm_folder, model_type="rm", train_file=train_file, lora=True,
                 max_steps=3, lr=1e-2)
    before, after = load_file(os.path.join(rm_folder, "model.safetensors")), weights(cfg.out_dir)
    assert set(after) == set(before)  # merged: plain HF keys, no lora_ names
    assert not torch.equal(after["score.weight"], before["score.weight"])
    assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])


def test_adapter_only_save_reloads(tmp_path, toy_files, rm_folder):
    from selfrm.modeling import load_model
    train_file, _ = toy_files
    cfg, _ = run(tmp_path, "adapter", model=rm_folder, model_type="rm", train_file=train_file, lora=True,
                 save_adapter_only=True, max_steps=2, lr=1e-2)
    assert os.path.exists(os.path.join(cfg.out_dir, "model", "adapter_config.json"))
    model, _ = load_model(cfg, os.path.join(cfg.out_dir, "model"))
    base, _ = load_model(cfg, rm_folder)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert not torch.allclose(model(ids, torch.ones_like(ids)), base(ids, torch.ones_like(ids)))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_autocast_trains_on_cpu(tmp_path, toy_files, pm_folder, dtype):
    train_file, _ = toy_files
    cfg, record = run(tmp_path, dtype, model=pm_folder, train_file=train_file, dtype=dtype, max_steps=4)
    fp32_cfg, fp32 = run(tmp_path, dtype + "32", model=pm_folder, train_file=train_file, dtype="fp32", max_steps=4)
    assert record["train_loss"] == pytest.approx(fp32["train_loss"], rel=0.05)


@pytest.mark.parametrize("native, emulated, expected", [(True, True, torch.bfloat16), (False, True, None),
                                                       (False, False, None)])
def test_dtype_auto_is_bf16_only_on_a_gpu_that_has_it_natively(monkeypatch, native, emulated, expected):
    """--dtype=auto: bf16 on an A100/H100 (native), fp32 on a V100/T4 (bf16 only by slow emulation)."""
    from selfrm.trainer import autocast_dtype
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: emulated if including_emulation
                        else native)
    cfg = make(TrainSettings, dtype="auto")
    assert autocast_dtype(cfg, torch.device("cuda", 0)) is expected
    assert autocast_dtype(cfg, torch.device("cpu")) is None


# ----------------------------------------------------------------------------- resume

def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, toy_files, pm_folder, monkeypatch):
    train_file, _ = toy_files
    common = dict(model=pm_folder, train_file=train_file, max_steps=7, save_every=2, log_every=1)
    cfg, _ = run(tmp_path, "straight", **common)
    reference = weights(cfg.out_dir)

    revive = kill_at_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "crashed", **common)
    out = tmp_path / "crashed"
    assert not (out / "model").exists() and (out / "checkpoint" / "state.pt").exists()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]  # nothing half-written
    revive()
    run(tmp_path, "crashed", **common)
    resumed = weights(str(out))
    assert resumed.keys() == reference.keys()
    for k in reference:
        assert torch.equal(resumed[k], reference[k]), k
    steps = [json.loads(line)["step"] for line in open(out / "train_log.jsonl")]
    assert steps == list(range(1, 8))  # the log has each step once
    assert not (out / "checkpoint").exists()


def test_rerun_with_other_settings_is_refused(tmp_path, toy_files, pm_folder):
    train_file, _ = toy_files
    run(tmp_path, "r", model=pm_folder, train_file=train_file, max_steps=1)
    with pytest.raises(SettingsError, match=r"other settings \(lr: 0\.002 -> 1\.0\): to start over in it, pass "
                                            r"--resume=false --overwrite=true"):
        run(tmp_path, "r", model=pm_folder, train_file=train_file, max_steps=1, lr=1.0)


# ----------------------------------------------------------------------------- DDP

def test_two_gloo_ranks_match_one_process(tmp_path, toy_files, pm_folder):
    train_file, _ = toy_files
    args = [f"--model={pm_folder}", f"--train_file={train_file}", "--max_steps=4", "--global_batch_size=16",
            "--micro_batch_size=4", "--lr=2e-3", "--warmup_steps=1", "--log_every=2"]
    run_one_and_two_ranks("train.py", args, "out_dir", tmp_path / "one", tmp_path / "two", 29533)
    one, two = weights(str(tmp_path / "one")), weights(str(tmp_path / "two"))
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
    logs = [[json.loads(line) for line in open(tmp_path / d / "train_log.jsonl")] for d in ("one", "two")]
    assert [r["loss"] for r in logs[1]] == pytest.approx([r["loss"] for r in logs[0]], rel=1e-4)


@pytest.mark.parametrize("option", ["gradient_checkpointing", "group_by_length"])
def test_speed_options_do_not_change_the_result(tmp_path, toy_files, pm_folder, option):
    """Checkpointing recomputes activations; grouping reorders pairs inside each global batch:
    neither may change the weights after a few steps (up to float rounding)."""
    train_file, _ = toy_files
    common = dict(model=pm_folder, train_file=train_file, max_steps=3, micro_batch_size=4)
    plain_cfg, _ = run(tmp_path, "plain", **common)
    fast_cfg, _ = run(tmp_path, "fast", **common, **{option: True})
    plain, fast = weights(plain_cfg.out_dir), weights(fast_cfg.out_dir)
    for k in plain:
        torch.testing.assert_close(fast[k], plain[k], rtol=1e-4, atol=1e-5)


def test_bf16_frozen_weights_halve_the_base_and_merge_in_fp32(tmp_path, toy_files, rm_folder, monkeypatch):
    """--weights_dtype=bf16 (rm, LoRA): the frozen base is bf16 and the adapters and peft's score
    head fp32 while training; losses stay within bf16's reach of the fp32 run; the merged model
    is fp32(bf16(W)) + (alpha/r) B A exactly, which a merge in bf16 would round away."""
    from selfrm import steps
    from selfrm.dist import Dist
    from selfrm.steps import train_run
    trained = []  # the model as training receives it (train_run returns the one saved and loaded back)
    real_train = steps.train
    monkeypatch.setattr(steps, "train", lambda cfg, model, *a, **k: trained.append(model) or real_train(cfg, model, *a, **k))
    train_file, _ = toy_files
    pairs = load_pairs(train_file)
    common = dict(model=rm_folder, model_type="rm", train_file=train_file, lora=True, lora_dropout=0.0, max_steps=3,
                  lr=1e-2, log_every=1)
    runs = {}
    for name, extra in (("fp32", {}), ("bf16", {"weights_dtype": "bf16"}),
                        ("adapter", {"weights_dtype": "bf16", "save_adapter_only": True})):
        cfg = make(TrainSettings, out_dir=str(tmp_path / name), **{**FAST, **common, **extra})
        train_run(cfg, Dist(), pairs, cfg.out_dir, cfg.model)
        runs[name], model = cfg.out_dir, trained[-1]
        if name != "bf16":
            continue
        frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
        trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
        assert frozen == {torch.bfloat16} and set(trainable.values()) == {torch.float32}
        assert any("lora_A" in n for n in trainable) and any("score" in n for n in trainable)
    loss = lambda name: [json.loads(line)["loss"] for line in open(os.path.join(runs[name], "train_log.jsonl"))]
    assert len(loss("bf16")) == 3 and loss("bf16") != loss("fp32")
    np.testing.assert_allclose(loss("bf16"), loss("fp32"), atol=2e-3)
    # the merge, by hand from the adapter run (same seed, same steps: the same adapters)
    base, merged = load_file(os.path.join(rm_folder, "model.safetensors")), weights(runs["bf16"])
    adapter = load_file(os.path.join(runs["adapter"], "model", "adapter_model.safetensors"))
    assert all(v.dtype == torch.float32 for v in merged.values())
    a = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    w = base["model.layers.0.self_attn.q_proj.weight"].bfloat16().float()
    update = (32 / 8) * b @ a
    got = merged["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(got, w + update, rtol=0, atol=1e-6)
    assert (((w + update).bfloat16().float() - got).abs().max() > 1e-4)  # what a bf16 merge would have saved
    torch.testing.assert_close(merged["score.weight"], adapter["base_model.model.score.weight"])


@pytest.mark.parametrize("extra, message", [({}, "without --lora every weight trains"),
                                            ({"lora": True, "fsdp": True}, "is for DDP: under --fsdp")])
def test_bf16_frozen_weights_need_lora_without_fsdp(extra, message):
    with pytest.raises(SettingsError, match=message):
        make(TrainSettings, weights_dtype="bf16", **extra)
