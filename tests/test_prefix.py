"""Shared-prefix layout (issue 22): the mask and positions by hand, the same rewards and
probabilities as separate sequences on every supported architecture and on real text, the
same training (one process, DDP, FSDP), and --share_prefix's settings."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import free_port, need_data, real_like_config, write_jsonl
from selfrm import sharing
from selfrm.encoding import Encoder
from selfrm.formats import load_pairs
from selfrm.dist import Dist
from selfrm.modeling import PreferenceModel, RewardModel, load_model
from selfrm.scoring import score_encoded
from selfrm.settings import LabelSettings, SettingsError, TrainSettings, make
from test_fsdp import torchrun

EXACT = dict(rtol=0, atol=1e-5)


def forward_tokens(model):
    """A list that receives the number of tokens of every forward of `model` (its embeddings' input)."""
    seen = []
    model.hf.get_input_embeddings().register_forward_pre_hook(lambda module, args: seen.append(args[0].numel()))
    return seen


def both_ways(model, encoded, pad_id, label_ids):
    """score_encoded unshared and shared, and the tokens each fed to the model."""
    tokens = forward_tokens(model)
    unshared = score_encoded(model, encoded, pad_id, label_ids, Dist(), batch_size=4)
    n_unshared = sum(tokens)
    shared = score_encoded(model, encoded, pad_id, label_ids, Dist(), batch_size=4, share_prefix=True)
    return unshared, shared, n_unshared, sum(tokens) - n_unshared


# ----------------------------------------------------------------------------- the layout by hand

def test_split_plan_by_hand():
    """Split attention's parts of the layout below: part 1 the first 5 columns (row 0's prefix
    and suffix 1), suffix 2's queries at column 5 (row 0) and 2 (row 1, then a pad slot), their
    keys the prefix then suffix 2."""
    batch = sharing.pack_pairs([([5, 6, 7, 8, 9], [5, 6, 7, 3]), ([1, 2], [1, 2])], 0, sharing.last_token)
    whole = sharing.additive(sharing.pair_attention(batch["segment_ids"], batch["position_ids"]), torch.float32)
    mask_1 = sharing.split_plan(batch["segment_ids"], batch["position_ids"], None, torch.float32)
    assert torch.equal(mask_1, whole[:, :, :5, :5])
    plan = mask_1.split_plan
    assert plan["query_cols"].tolist() == [[5], [2]]
    assert plan["key_cols"].tolist() == [[0, 1, 2, 5], [0, 2, 3, 4]]  # 3, 4: pads, masked
    assert (plan["mask_2"][:, 0] == 0).tolist() == [[[True, True, True, True]], [[True, True, False, False]]]
    # each suffix-2 query sees in the gathered keys what it sees in the whole mask
    for b, (queries, keys) in enumerate(zip(plan["query_cols"], plan["key_cols"])):
        assert torch.equal(plan["mask_2"][b, 0, 0, :2], whole[b, 0, queries[0], keys[:2]])
    windowed = sharing.split_plan(batch["segment_ids"], batch["position_ids"], 2, torch.float32).split_plan
    assert (windowed["mask_2"][0, 0] == 0).tolist() == [[False, False, True, True]]  # position 3 sees 2 and itself


def test_layout_mask_and_positions_by_hand():
    """Prefix [5 6 7], suffixes [8 9] and [3]: suffix 2 restarts at position 3 and sees the
    prefix and itself, never suffix 1; a window of 2 counts positions, not columns."""
    batch = sharing.pack_pairs([([5, 6, 7, 8, 9], [5, 6, 7, 3]), ([1, 2], [1, 2])], 0, sharing.last_token)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 3], [1, 2, 2, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 1, 0, 0, 0]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 2], [0, 1, 2, -1, -1, -1]]
    assert batch["read_positions"].tolist() == [[4, 5], [1, 2]]  # identical sequences keep one token each
    allowed = sharing.pair_attention(batch["segment_ids"], batch["position_ids"])[:, 0].int().tolist()
    assert allowed[0] == [[1, 0, 0, 0, 0, 0],
                          [1, 1, 0, 0, 0, 0],
                          [1, 1, 1, 0, 0, 0],
                          [1, 1, 1, 1, 0, 0],
                          [1, 1, 1, 1, 1, 0],
                          [1, 1, 1, 0, 0, 1]]  # suffix 2: the prefix and itself
    assert allowed[1][3:] == [[0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]]  # pads: themselves only
    window = sharing.pair_attention(batch["segment_ids"], batch["position_ids"], window=2)[0, 0].int().tolist()
    assert window[5] == [0, 0, 1, 0, 0, 1]  # position 3 sees position 2 (column 2), not column 4
    assert window[4] == [0, 0, 0, 1, 1, 0]
    mask = sharing.additive(sharing.pair_attention(batch["segment_ids"], batch["position_ids"]), torch.bfloat16)
    assert mask.dtype == torch.bfloat16 and mask[0, 0, 5, 4] == torch.finfo(torch.bfloat16).min and mask[0, 0, 5, 2] == 0


# ----------------------------------------------------------------------------- the same numbers

# configs where what the layout must keep shows in the numbers: Gemma-2's attention soft-cap at 1 and
# a query scale that is not head_dim (with q and k scaled up so that scores reach the cap); a Qwen2
# whose second layer slides a window of 8 over contexts longer than that
VARIANTS = {"gemma2-capped": ("gemma2", dict(attn_logit_softcapping=1.0, query_pre_attn_scalar=4)),
            "qwen2-sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1))}


def tiny_model(arch, kind, vocab_size, pad_id):
    torch.manual_seed(0)
    base, overrides = VARIANTS.get(arch, (arch, {}))
    config = real_like_config(base, vocab_size, kind)
    if overrides:
        config = type(config)(**{**{k: v for k, v in config.to_dict().items() if k != "layer_types"}, **overrides})
    config.pad_token_id = pad_id
    if kind == "pm":
        from transformers import AutoModelForCausalLM
        model = PreferenceModel(AutoModelForCausalLM.from_config(config, dtype=torch.float32)).eval()
    else:
        from transformers import AutoModelForSequenceClassification
        model = RewardModel(AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)).eval()
    if arch == "gemma2-capped":
        with torch.no_grad():
            for name, weight in model.hf.named_parameters():
                if name.endswith(("q_proj.weight", "k_proj.weight")):
                    weight.mul_(20)
    return model


def multi_turn_pairs(n, seed):
    """Id pairs of a shared context of several turns (longer than Gemma-2's and Mistral's window
    of 8) and two responses, some with a common start."""
    g = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        turns = [g.integers(5, 60, g.integers(3, 12)).tolist() + [3] for _ in range(g.integers(1, 5))]
        context = [t for turn in turns for t in turn]
        common = g.integers(5, 60, g.integers(0, 4)).tolist()
        pairs.append(tuple(context + common + g.integers(5, 60, g.integers(1, 15)).tolist() + [4] for _ in range(2)))
    return pairs


@pytest.mark.parametrize("arch", ["llama3", "gemma2", "mistral", "qwen2", "gemma2-capped", "qwen2-sliding"])
@pytest.mark.parametrize("kind", ["rm", "pm"])
def test_shared_scores_equal_separate_sequences(arch, kind, monkeypatch):
    """The same numbers; the shared path ran (each context once) and split its attention in two
    calls per layer (10 pairs, batches of 4: 3 forwards of 2 layers)."""
    model = tiny_model(arch, kind, 64, 0)
    calls = []
    wrapped = sharing.wrapped_attention
    monkeypatch.setattr(sharing, "wrapped_attention",
                        lambda module: lambda *args, **kwargs: calls.append(1) or wrapped(module)(*args, **kwargs))
    unshared, shared, n_unshared, n_shared = both_ways(model, multi_turn_pairs(10, 1), 0,
                                                       {"A": 7, "B": 8} if kind == "pm" else None)
    assert n_shared < 0.75 * n_unshared
    assert len(calls) == 2 * 3 * 2
    for key in unshared:
        np.testing.assert_allclose(shared[key], unshared[key], **EXACT)


def test_the_reward_is_read_at_the_last_token_that_is_not_padding():
    """A pad id that also ends every sequence (4, as an eos used for padding): a sequence
    classifier reads its score at the last token that is not the pad id, and so must the layout."""
    model = tiny_model("llama3", "rm", 64, 4)
    unshared, shared, _, _ = both_ways(model, multi_turn_pairs(10, 3), 4, None)
    for key in unshared:
        np.testing.assert_allclose(shared[key], unshared[key], **EXACT)


@pytest.mark.parametrize("arch", ["gemma2", "llama3"])
def test_bf16_autocast_stays_finite_and_close(arch):
    """Under bf16 autocast (the mask in bf16, eager for Gemma-2, sdpa for Llama): no NaN from
    the pad rows, and the rewards of separate sequences up to bf16 rounding."""
    model = tiny_model(arch, "rm", 64, 0)
    encoded = multi_turn_pairs(6, 2)
    run = lambda share: score_encoded(model, encoded, 0, None, Dist(), 4, torch.bfloat16, share_prefix=share)
    unshared, shared = run(False), run(True)
    assert np.isfinite(shared["reward_a"]).all() and np.isfinite(shared["reward_b"]).all()
    np.testing.assert_allclose(shared["reward_a"], unshared["reward_a"], atol=0.05)


@pytest.mark.parametrize("max_length", [512, 1024])
def test_real_text_scores_equal_separate_sequences(smollm2_tokenizer, max_length):
    """SmolLM2's tokenizer and chat template on HH-RLHF (multi-turn) and UltraFeedback rows,
    both kinds; Gemma-2 for the rm (window, soft-capping), Llama 3 for the pm."""
    tok = smollm2_tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    pairs = load_pairs(need_data("hh-rlhf-harmless-base-test.jsonl.gz"))[:40]
    pairs = sorted(pairs, key=lambda p: -len(p.prompt))[:3]  # the most turns
    pairs += load_pairs(need_data("ultrafeedback-binarized-1k-train.jsonl"), bad_rows="skip")[:3]
    assert len(pairs[0].prompt) >= 3
    for kind, arch in (("rm", "gemma2"), ("pm", "llama3")):
        encoder = Encoder(tok, kind, max_length)
        encoded = encoder.encode_score([p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs])
        model = tiny_model(arch, kind, len(tok), pad_id)
        unshared, shared, n_unshared, n_shared = both_ways(model, encoded, pad_id, encoder.label_ids or None)
        assert n_shared < n_unshared
        for key in unshared:
            np.testing.assert_allclose(shared[key], unshared[key], **EXACT)


# ----------------------------------------------------------------------------- the same training

@pytest.mark.parametrize("arch,extra", [
    ("gemma2", dict(gradient_checkpointing=True, overlong="drop", max_length=32)),
    ("llama3", dict(lora=True, lora_dropout=0.0)),
    ("mistral", dict(lora=True, lora_dropout=0.0, weights_dtype="bf16")),
])
def test_training_is_the_same_step_by_step(tmp_path, toy_files, real_like, monkeypatch, arch, extra):
    """rm training, shared or not: the same loss at every step and the same final weights; the
    shared run's batches are in the layout (one row per pair)."""
    from selfrm import trainer
    rows = []
    real_pair_rewards = trainer.pair_rewards
    monkeypatch.setattr(trainer, "pair_rewards", lambda model, batch: rows.append(batch["input_ids"].shape[0])
                        or real_pair_rewards(model, batch))

    data = [json.loads(line) for line in open(toy_files[0])][:64]
    for i, row in enumerate(data):  # multi-turn contexts of 1, 3 and 5 turns (5: over max_length=32)
        row["prompt"] = [{"role": ("user", "assistant")[t % 2], "content": row["prompt"]} for t in range(1 + 2 * (i % 3))]
    train_file = write_jsonl(tmp_path / "multi_turn.jsonl", data)

    def run(share):
        cfg = make(TrainSettings, model=real_like(arch, "rm"), model_type="rm", train_file=train_file,
                   out_dir=str(tmp_path / share), share_prefix=share, max_steps=4, global_batch_size=8,
                   micro_batch_size=4, lr=2e-3, warmup_steps=1, log_every=1, **extra)
        train.main(cfg)
        log = [json.loads(line)["loss"] for line in open(tmp_path / share / "train_log.jsonl")]
        return log, load_file(tmp_path / share / "model" / "model.safetensors")

    (loss_f, weights_f), rows_f = run("false"), rows[:]
    rows.clear()
    loss_t, weights_t = run("true")
    assert set(rows_f) == {8} and set(rows) == {4}  # 2 sequences a pair unshared, 1 row a pair shared
    if "overlong" in extra:
        assert json.load(open(tmp_path / "true" / "model" / "summary.json"))["dropped"] > 0
    # bf16 compute rounds differently in rows of another shape, and Adam's steps of about lr
    # turn that rounding into weight differences of about lr
    exact = "weights_dtype" not in extra
    assert len(loss_t) == 4
    np.testing.assert_allclose(loss_t, loss_f, **(EXACT if exact else dict(rtol=0, atol=2e-3)))
    for k in weights_f:
        torch.testing.assert_close(weights_t[k], weights_f[k], **(EXACT if exact else dict(rtol=0, atol=8e-3)))


def test_ddp_and_fsdp_train_like_one_process(tmp_path, toy_files, rm_folder):
    """2 gloo ranks with the layout (auto turns it on for the toy Llama, and says so) train as one
    process without it."""
    args = [f"--model={rm_folder}", "--model_type=rm", f"--train_file={toy_files[0]}", "--max_steps=3",
            "--global_batch_size=8", "--micro_batch_size=2", "--lr=2e-3", "--warmup_steps=1", "--log_every=1"]
    train.main(make(TrainSettings, model=rm_folder, model_type="rm", train_file=toy_files[0], max_steps=3,
                    global_batch_size=8, micro_batch_size=2, lr=2e-3, warmup_steps=1, log_every=1,
                    share_prefix="false", out_dir=str(tmp_path / "one")))
    one = [json.loads(line)["loss"] for line in open(tmp_path / "one" / "train_log.jsonl")]
    ref = load_file(tmp_path / "one" / "model" / "model.safetensors")
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp=true"])):
        done = torchrun(args + extra + [f"--out_dir={tmp_path / name}"], free_port())
        assert done.returncode == 0, done.stderr[-3000:]
        assert "--share_prefix=auto: on for llama" in done.stdout + done.stderr
        got = [json.loads(line)["loss"] for line in open(tmp_path / name / "train_log.jsonl")]
        np.testing.assert_allclose(got, one, rtol=1e-4, atol=1e-5)
        weights = load_file(tmp_path / name / "model" / "model.safetensors")
        for k in ref:
            torch.testing.assert_close(weights[k], ref[k], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- the switch

def test_share_prefix_setting_names_the_architecture(capsys, rm_folder):
    from transformers import BertConfig
    bert = BertConfig()
    with pytest.raises(SettingsError, match="--share_prefix=true: bert is not one of"):
        sharing.resolve_share_prefix("true", bert)
    assert sharing.resolve_share_prefix("auto", bert) is False
    assert "--share_prefix=auto: off for bert" in capsys.readouterr().out
    flash = real_like_config("llama3", 64, "rm")
    flash._attn_implementation = "flash_attention_2"
    with pytest.raises(SettingsError, match="flash_attention_2 attention, which takes no custom mask"):
        sharing.resolve_share_prefix("true", flash)
    with pytest.raises(SettingsError, match="share_prefix='sometimes'"):
        make(LabelSettings, share_prefix="sometimes")
    model, _ = load_model(make(LabelSettings, model=rm_folder, model_type="rm"))
    assert sharing.resolve_share_prefix("false", model.hf.config) is False
    assert sharing.resolve_share_prefix("auto", model.hf.config) is True


def test_a_run_resumes_whatever_its_share_prefix(tmp_path):
    """--share_prefix changes no number beyond 1e-5: a run started with another value (or before
    the setting existed) is the same run."""
    from selfrm import rundir
    cfg = make(TrainSettings, model_type="rm", out_dir=str(tmp_path), share_prefix="false")
    saved = {k: v for k, v in make(TrainSettings, model_type="rm", out_dir=str(tmp_path)).__dict__.items()
             if k != "share_prefix"}
    (tmp_path / "settings.json").write_text(json.dumps(saved))
    (tmp_path / "manifest.json").write_text(json.dumps({"final_model": "model", "rounds": [{"round": 0}]}))
    assert rundir.finished_run(cfg) == "model"
    rundir.claim_out_dir(cfg, Dist(), {})
