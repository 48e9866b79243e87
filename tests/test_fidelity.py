"""How selfrm trains, made what SPEC describes (issue: faithful at the papers' lengths):
training mode, checkpointing that recomputes, AdamW groups, logit scaling, the paper
configs, --preview, and the fixes to adapter reloads, empty statuses and eval overlap."""
import io
import json
import os
import re

import numpy as np
import pytest
import torch

import train
from conftest import ROOT, write_jsonl
from test_selftrain import loop
from selfrm.formats import load_pairs
from selfrm.dist import Dist
from selfrm.filters import learning_status
from selfrm.modeling import PreferenceModel
from selfrm.settings import TrainSettings, make, parse_args
from selfrm.trainer import make_optimizer

FAST = dict(lr=2e-3, warmup_steps=2, global_batch_size=16, micro_batch_size=8, log_every=5)


# ----------------------------------------------------------------------------- training mode

def mlp_calls(monkeypatch, cfg, tmp_path, name):
    """Run train.main, recording (grad enabled, training mode) at every call of a decoder
    layer's MLP. Counted inside forward itself: a checkpoint's recompute runs no module hooks."""
    from transformers.models.llama import modeling_llama
    calls = []
    real = modeling_llama.LlamaMLP.forward

    def counting(self, x):
        calls.append((torch.is_grad_enabled(), self.training))
        return real(self, x)
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counting)
    train.main(make(TrainSettings, out_dir=str(tmp_path / name), **cfg))
    return calls


@pytest.mark.parametrize("checkpointing", [False, True])
def test_train_mode_and_the_recompute_of_checkpointing(tmp_path, toy_files, pm_folder, monkeypatch, checkpointing):
    """Each of the 2 decoder layers runs once per micro-batch forward; with checkpointing it
    runs again in the backward (the recompute). Dropout is on while training, off while
    scoring. (The library only checkpoints in training mode: both used to be off.)"""
    train_file, eval_file = toy_files
    cfg = dict(FAST, model=pm_folder, train_file=train_file, eval_file=eval_file, max_steps=2, micro_batch_size=8,
               gradient_checkpointing=checkpointing)
    calls = mlp_calls(monkeypatch, cfg, tmp_path, str(checkpointing))
    training = [mode for grad, mode in calls if grad]
    scoring = [mode for grad, mode in calls if not grad]
    forwards = 2 * 2 * 2  # 2 steps x 2 micro-batches of 8 x 2 layers
    assert len(training) == forwards * (2 if checkpointing else 1)
    assert all(training)
    assert scoring and not any(scoring)


def test_lora_dropout_is_active_while_training(tmp_path, toy_files, rm_folder, monkeypatch):
    """With LoRA dropout 0.9 two forwards of the same batch differ in training mode (from the
    second step: LoRA's B starts at zero, so before the first update dropout cannot show)."""
    from selfrm import trainer
    seen = []
    real = trainer.pair_losses

    def twice(model, batch, *args):
        first = real(model, batch, *args)[0]
        second = real(model, batch, *args)
        seen.append(not torch.allclose(first, second[0]))
        return second
    monkeypatch.setattr(trainer, "pair_losses", twice)
    train_file, _ = toy_files
    train.main(make(TrainSettings, out_dir=str(tmp_path / "d"), **{**FAST, "model": rm_folder, "model_type": "rm",
                                                                  "train_file": train_file, "lora": True,
                                                                  "lora_dropout": 0.9, "max_steps": 2}))
    assert len(seen) == 4 and seen[2:] == [True, True]  # 2 micro-batches per step


# ----------------------------------------------------------------------------- AdamW groups

def test_weight_decay_spares_every_one_dimensional_parameter(pm_folder):
    from selfrm.modeling import load_model
    model, _ = load_model(make(TrainSettings, model=pm_folder, model_type="pm"))
    params = [p for p in model.parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = make_optimizer(params, make(TrainSettings, lr=0.1, weight_decay=0.5), torch.device("cpu"))
    for p in params:
        p.grad = torch.zeros_like(p)  # Adam's step is 0: only the decay moves a weight
    optimizer.step()
    one_d = [n for n, p in model.named_parameters() if p.ndim == 1]
    assert any("norm" in n for n in one_d)
    for n, p in model.named_parameters():
        expected = before[n] if p.ndim == 1 else before[n] * (1 - 0.1 * 0.5)
        torch.testing.assert_close(p.detach(), expected, msg=n)


# ----------------------------------------------------------------------------- logit scaling

def tiny(cls_name, **extra):
    import transformers
    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(config_cls(**common, **extra)).eval()


@pytest.mark.parametrize("cls_name, extra", [
    ("CohereForCausalLM", {"logit_scale": 0.37}),
    ("GraniteForCausalLM", {"logits_scaling": 4.0}),
    ("Gemma2ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 0.5}),
])
def test_label_logits_equal_the_models_own_forward_when_it_scales_logits(cls_name, extra):
    hf = tiny(cls_name, **extra)
    ids = torch.randint(3, 64, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    positions = mask.sum(1) - 1
    with torch.no_grad():
        full = hf(input_ids=ids, attention_mask=mask).logits[torch.arange(3), positions]
        ours = PreferenceModel(hf)(ids, mask, positions)
        plain_head = hf.get_output_embeddings()(hf.model(input_ids=ids, attention_mask=mask).last_hidden_state)
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)
    ab = PreferenceModel(hf)(ids, mask, positions, token_ids=torch.tensor([5, 6]))
    torch.testing.assert_close(ab.softmax(-1), full[:, [5, 6]].softmax(-1))
    # the check has teeth: the bare head gives other logits for these architectures
    assert not torch.allclose(plain_head[torch.arange(3), positions], full, atol=1e-3)


@pytest.mark.parametrize("cls_name, extra, scaled", [
    ("LlamaForCausalLM", {}, lambda z: z),
    ("Gemma2ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 30.0}, lambda z: 30.0 * torch.tanh(z / 30.0)),
    ("CohereForCausalLM", {"logit_scale": 0.5}, lambda z: 0.5 * z),
])
def test_label_logits_are_fp32_from_the_last_hidden_state_under_bf16_autocast(cls_name, extra, scaled):
    """Under autocast (and FSDP's bf16) the head's output would be rounded to bf16: a step of 0.125
    for logits between 16 and 32. The A/B logits, and training's full-vocabulary ones, are the
    fp32 product of the last hidden state and the head's rows, then the LM's own scaling."""
    hf = tiny(cls_name, tie_word_embeddings=False, **extra)  # untied: scaling the head leaves the hidden states
    ids = torch.randint(3, 64, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    positions = mask.sum(1) - 1
    token_ids = torch.tensor([5, 6])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = hf.model(input_ids=ids, attention_mask=mask).last_hidden_state[torch.arange(3), positions]
        head = hf.get_output_embeddings().weight
        head.mul_(24 / (hidden @ head[token_ids].T).abs().max())  # A/B logits up to 24, where bf16's step is 0.125
        ab = PreferenceModel(hf)(ids, mask, positions, token_ids=token_ids)
        full = PreferenceModel(hf)(ids, mask, positions)
    weight = hf.get_output_embeddings().weight.double()
    hand = scaled(hidden.double() @ weight.T)
    assert ab.dtype == full.dtype == torch.float32
    torch.testing.assert_close(ab.double(), hand[:, token_ids], rtol=0, atol=1e-3)
    torch.testing.assert_close(full.double(), hand, rtol=0, atol=1e-3)


def test_label_logits_of_a_head_the_lm_reads_or_adapts_are_its_own_forwards():
    """Mamba's forward reads lm_head.weight.dtype off the head PreferenceModel swaps in; a head that
    LoRA wraps (not a plain Linear) runs as itself. Both give the model's own logits."""
    import transformers
    mamba = transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=64, hidden_size=16, state_size=4,
                                                                   num_hidden_layers=1, expand=2)).eval()
    from peft import LoraConfig, get_peft_model
    adapted = get_peft_model(tiny("LlamaForCausalLM"), LoraConfig(r=2, target_modules=["lm_head", "q_proj"],
                                                                   init_lora_weights=False)).eval()
    ids = torch.randint(3, 64, (2, 7))
    positions = torch.full((2,), 6)
    for hf in (mamba, adapted):
        with torch.no_grad():
            full = hf(input_ids=ids).logits[:, -1]
            ours = PreferenceModel(hf)(ids, torch.ones_like(ids), positions)
            ab = PreferenceModel(hf)(ids, torch.ones_like(ids), positions, token_ids=torch.tensor([5, 6]))
        torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ab, full[:, [5, 6]], rtol=1e-5, atol=1e-5)
        assert type(PreferenceModel(hf).hf.get_output_embeddings()).__name__ != "_Rows"  # the head is put back


# ----------------------------------------------------------------------------- fixes

def test_an_empty_selection_never_meets_a_status():
    far = np.array([0.9, 0.1]), np.array([0.1, 0.9])
    result = learning_status(np.array([0.5, 0.5]), np.array([0.5, 0.5]), min_count=0, min_fraction=0.0)
    assert result.met == "converged" and result.needed == 1 and not result.keep.any()
    assert learning_status(*far, min_count=0).met == "status1"  # one qualifying pair is enough at 0


def test_adapter_only_saves_continue_from_the_previous_round(tmp_path, rm_folder, loop_files):
    cfg, rounds = loop(tmp_path, "adapters", loop_files, model=rm_folder, model_type="rm", lora=True,
                       save_adapter_only=True, init_from="previous", rounds=2, threshold=0.5)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for t in range(3):
        with open(os.path.join(cfg.out_dir, f"round_{t}", "model", "adapter_config.json")) as f:
            assert json.load(f)["base_model_name_or_path"] == rm_folder


def test_eval_pairs_seen_in_training_are_counted_and_recorded(tmp_path, toy_files, pm_folder, capsys):
    train_file, eval_file = toy_files
    mixed = load_pairs(eval_file)[:5]
    rows = [{"prompt": p.prompt, "chosen": p.rejected, "rejected": p.chosen} for p in load_pairs(train_file)[:3]]
    rows += [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in mixed]
    eval_path = write_jsonl(tmp_path / "eval.jsonl", rows)  # 3 training pairs (swapped) + 5 held-out ones
    cfg = make(TrainSettings, out_dir=str(tmp_path / "o"), **{**FAST, "model": pm_folder, "train_file": train_file,
                                                              "eval_file": eval_path, "max_steps": 1})
    train.main(cfg)
    assert "warning: 3 of 8 eval pairs also appear in the train file" in capsys.readouterr().out
    with open(os.path.join(cfg.out_dir, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["eval_overlap"] == {"train_file": 3, "unlabeled_file": 0}
    assert manifest["sequences"]["eval_file"] == {"pairs": 8, "truncated": 0, "dropped": 0}


def test_truncated_and_dropped_counts_reach_the_manifest(tmp_path, pm_folder, toy_files):
    train_file, _ = toy_files
    pairs = load_pairs(train_file)[:32]
    rows = [{"prompt": p.prompt, "chosen": p.chosen + " w1" * (30 if i % 4 == 0 else 0), "rejected": p.rejected}
            for i, p in enumerate(pairs)]  # 8 of 32 pairs are too long for 30 tokens
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    for mode, counts in (("truncate", {"pairs": 32, "truncated": 8, "dropped": 0}),
                         ("drop", {"pairs": 32, "truncated": 0, "dropped": 8})):
        cfg = make(TrainSettings, out_dir=str(tmp_path / mode), **{**FAST, "model": pm_folder, "train_file": path,
                                                                   "max_length": 30, "overlong": mode, "max_steps": 1})
        record = train.main(cfg)
        with open(os.path.join(cfg.out_dir, "manifest.json")) as f:
            assert json.load(f)["sequences"]["train_file"] == {k: counts[k] for k in ("truncated", "dropped")}, mode
        assert (record["truncated"], record["dropped"]) == (counts["truncated"], counts["dropped"])


# ----------------------------------------------------------------------------- --preview

def preview_lines(argv):
    out = io.StringIO()
    import contextlib
    with contextlib.redirect_stdout(out):
        train.main(train.settings_from_argv(argv))
    return [json.loads(line) for line in out.getvalue().splitlines()]


@pytest.mark.parametrize("kind", ["pm", "rm"])
def test_preview_prints_what_training_feeds_first_and_writes_nothing(tmp_path, toy_files, kind, pm_folder, rm_folder):
    from selfrm.trainer import example_length
    from selfrm.modeling import load_tokenizer
    from selfrm.steps import encode_training
    from selfrm.trainer import global_batches, micro_batches
    train_file, _ = toy_files
    out_dir = tmp_path / "never"
    argv = [f"--model={pm_folder if kind == 'pm' else rm_folder}", f"--model_type={kind}", f"--train_file={train_file}",
            "--global_batch_size=8", "--micro_batch_size=2", "--max_length=20", "--preview=6", f"--out_dir={out_dir}"]
    lines = preview_lines(argv)
    assert not out_dir.exists()
    # the same sequences, recomputed from the training loop's own plan
    cfg = train.settings_from_argv(argv)
    tok = load_tokenizer(cfg)
    examples, encoder = encode_training(cfg, tok, load_pairs(train_file))
    first_batch = global_batches([example_length(e) for e in examples], cfg, Dist(), 0)[0]
    micro = micro_batches(first_batch, cfg, Dist())
    if kind == "pm":
        expected = [(examples[i]["input_ids"], "A" if examples[i]["label"] == encoder.label_ids["A"] else "B")
                    for m in micro for i in m][:6]
    else:
        # whole pairs: each pair's chosen sequence, then its rejected one
        expected = [(examples[i][key], side) for m in micro for i in m for key, side in
                    (("chosen_ids", "chosen"), ("rejected_ids", "rejected"))][:6]
    assert [(l["text"], l["label"], l["tokens"]) for l in lines] == \
        [(tok.decode(ids, skip_special_tokens=False), label, len(ids)) for ids, label in expected[:6]]
    assert max(l["tokens"] for l in lines) <= 20 and len({l["label"] for l in lines}) == 2
    # every line names its source row, file:line
    pairs = load_pairs(train_file)
    order = [i for m in micro for i in m for _ in range(1 if kind == "pm" else 2)][:6]
    assert [l["source"] for l in lines] == [pairs[i].where for i in order]
    assert all(l["source"].startswith(f"{train_file}:") for l in lines)


@pytest.mark.parametrize("name", ["ultrafeedback-binarized-1k-train.jsonl", "hh-rlhf-harmless-base-test.jsonl.gz"])
@pytest.mark.parametrize("kind", ["pm", "rm"])
def test_preview_of_real_files_keeps_every_marker_at_128_256_512(tmp_path, name, kind, smollm2_tokenizer):
    """The issue's 'done when': every training sequence of the real files with SmolLM2's
    template, at 128, 256 and 512 tokens, keeps each marker once and in order, ends at the
    label position (pm) or the end of the assistant turn (rm), and fits."""
    from conftest import need_data
    path = need_data(name)
    folder = tmp_path / "tok"
    smollm2_tokenizer.save_pretrained(folder)
    n_pairs = len(load_pairs(path, bad_rows="skip"))
    for max_length in (128, 256, 512):
        lines = preview_lines([f"--model={folder}", f"--model_type={kind}", f"--train_file={path}", "--bad_rows=skip",
                               f"--max_length={max_length}", "--preview=100000", f"--out_dir={tmp_path / 'x'}"])
        assert len(lines) == n_pairs * (1 if kind == "pm" else 2)
        head = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        for line in lines:
            text = line["text"]
            assert line["tokens"] <= max_length and text.startswith(head)
            if kind == "pm":
                spots = [text.find(m) for m in ("<|im_start|>user\n[CONTEXT] \n", "\n<turn> ", " [RESPONSE A] ",
                                                " [RESPONSE B] ", " \n<|im_end|>\n<|im_start|>assistant\n")]
                assert all(text.count(m) == 1 for m in ("[CONTEXT]", "[RESPONSE A]", "[RESPONSE B]")), text
                assert -1 not in spots and spots == sorted(spots), text
                assert text.endswith(" \n<|im_end|>\n<|im_start|>assistant\n") and line["label"] in ("A", "B")
            else:  # the last turn is the assistant's response, closed by the template's end of turn
                last = text.rsplit("<|im_start|>", 1)[1]
                assert re.fullmatch(r"assistant\n.+<\|im_end\|>\n", last, re.S), text[-300:]
                assert text.count("<|im_start|>") == text.count("<|im_end|>") and line["label"] in ("chosen", "rejected")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- the papers' configs

SPEC_VALUES = {  # SPEC 1a (SSRM), 1b (SER), 3 and 4: the phrase in SPEC, and the setting it gives
    "ssrm": [("lr 5e-6 (1e-5 for Gemma-2B)", None), ("cosine schedule with 40 warm-up steps", {"schedule": "cosine", "warmup_steps": 40}),
             ("1 epoch per round", {"epochs": 1}), ("global batch 128", {"global_batch_size": 128}),
             ("weight decay 0", {"weight_decay": 0.0}), ("grad-norm clip 1.0", {"grad_clip": 1.0}),
             ("bf16", {"dtype": "bf16"}), ("context 3072", {"max_length": 3072}), ("s = 0.8", {"threshold": 0.8}),
             ("T = 3 rounds", {"rounds": 3}), ("predicts one token", {"model_type": "pm", "filter": "confidence"})],
    "ser": [("LoRA r=8, alpha=32, dropout 0.1", {"lora": True, "lora_r": 8, "lora_alpha": 32, "lora_dropout": 0.1}),
            ("lr 2e-5 linear decay", {"lr": 2e-5, "schedule": "linear", "warmup_steps": 0}), ("2 epochs", {"epochs": 2}),
            ("batch 4 per device", {"micro_batch_size": 4}), ("max length 512", {"max_length": 512}),
            ("tau_high = 0.55", {"tau_high": 0.55}), ("tau_low = 0.45", {"tau_low": 0.45}),
            ("tau_delta = 0.3", {"tau_delta": 0.3}), ("the paper: 600 on HH-RLHF", {"status_min_count": 600}),
            ("the paper labels 15% of the data", {"labeled_fraction": 0.15}),
            ("A sequence classifier", {"model_type": "rm", "filter": "status", "status_mode": "sequential"})],
}
CONFIGS = {"ssrm-gemma-2b-quarter.json": ("ssrm", {"lr": 1e-5, "labeled_fraction": 0.25, "model": "google/gemma-2b-it"}),
           "ssrm-llama3-8b-sixteenth.json": ("ssrm", {"lr": 5e-6, "labeled_fraction": 0.0625,
                                                      "model": "meta-llama/Meta-Llama-3-8B-Instruct"}),
           "ser-llama3-8b-15pct.json": ("ser", {"model": "meta-llama/Meta-Llama-3-8B"}),
           "ser-mistral-7b-15pct.json": ("ser", {"model": "mistralai/Mistral-7B-v0.1"})}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_paper_configs_hold_specs_numbers(name):
    kind, own = CONFIGS[name]
    spec_path = os.path.join(os.path.dirname(ROOT), "shared", "SPEC.md")
    spec = " ".join(open(spec_path).read().split()) if os.path.exists(spec_path) else None
    expected = dict(own)
    for phrase, values in SPEC_VALUES[kind]:
        if spec is not None:
            assert phrase in spec, phrase  # the number is SPEC's, as SPEC writes it
        expected.update(values or {})
    path = os.path.join(ROOT, "configs", name)
    cfg = parse_args(TrainSettings, [f"--config={path}", "--out_dir=x"])  # loads through the real parser
    for key, value in expected.items():
        assert getattr(cfg, key) == value, (name, key)
    assert parse_args(TrainSettings, [f"--config={path}", "--lr=3e-6"]).lr == 3e-6  # flags after it win


def test_label_and_evaluate_record_how_many_rows_they_truncated(tmp_path, pm_folder, toy_files):
    import evaluate
    import label
    from selfrm.settings import EvalSettings, LabelSettings
    pairs = load_pairs(toy_files[0])[:32]
    long = lambda i, text: text + " w1" * (30 if i % 4 == 0 else 0)  # 8 of 32 rows over 30 tokens
    eval_path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": p.prompt, "chosen": long(i, p.chosen), "rejected": p.rejected}
                                                   for i, p in enumerate(pairs)])
    pool_path = write_jsonl(tmp_path / "u.jsonl", [{"prompt": p.prompt, "response_a": long(i, p.chosen),
                                                    "response_b": p.rejected} for i, p in enumerate(pairs)])
    _, summary = label.main(make(LabelSettings, model=pm_folder, unlabeled_file=pool_path, max_length=30,
                                 out_file=str(tmp_path / "l.jsonl")))
    assert summary["truncated"] == 8 and json.load(open(tmp_path / "l.summary.json"))["truncated"] == 8
    metrics = evaluate.main(make(EvalSettings, model=pm_folder, eval_file=eval_path, max_length=30,
                                 out_file=str(tmp_path / "m.json")))
    assert metrics["truncated"] == 8 and json.load(open(tmp_path / "m.json"))["truncated"] == 8
