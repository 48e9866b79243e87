"""Tests that pin the algorithm against hand computations and references (issue 20).

Each test checks one of the issue's nine properties against something other than the code
itself: the papers' rule written out by hand, autograd of a loss written out here, a full
forward of the plain Hugging Face model, or RewardBench's published table. Each was seen to
fail on a mutant that breaks its property (bench/mutation.py, bench/results/mutation.md).
"""
import json
import math
import os
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import train
from conftest import need_data, write_jsonl
from selfrm import metrics, scoring, toy, trainer
from selfrm.encoding import Encoder
from selfrm.formats import Pair, UnlabeledPair, load_pairs
from selfrm.dist import Dist
from selfrm.filters import learning_status
from selfrm.metrics import SECTIONS, calibration, rewardbench_sections
from selfrm.modeling import load_model
from selfrm.scoring import score_encoded
from selfrm.scoring import relabel
from selfrm.steps import train_run
from selfrm.settings import TrainSettings, make
from selfrm.trainer import Setup, backward_global_batch, make_collate

USER = lambda text: {"role": "user", "content": text}


# ----------------------------------------------------------------------------- 1, 2: the SSRM rounds

LOOP = dict(lr=3e-3, warmup_steps=1, global_batch_size=16, micro_batch_size=8, log_every=100, epochs=1, rounds=2,
            threshold=0.505)  # this weak model's confidences straddle 0.505: each round keeps another subset


def ssrm_loop(tmp_path, name, model, files, init_from):
    lab, pool, _ = files
    cfg = make(TrainSettings, model=model, train_file=lab, unlabeled_file=pool, out_dir=str(tmp_path / name),
               init_from=init_from, **LOOP)
    return cfg, train.main(cfg)


def kept_rows(cfg, t):
    """Round t's labeled pool: the rows it kept, with the pseudo-label and filter checked by hand."""
    rows = [json.loads(line) for line in open(os.path.join(cfg.out_dir, f"round_{t}", "pool.jsonl"))]
    for r in rows:
        assert r["pseudo_label"] == ("a" if r["prob_a"] > 0.5 else "b")
        assert r["keep"] == (max(r["prob_a"], 1 - r["prob_a"]) >= cfg.threshold)
    return [r for r in rows if r["keep"]]


def d_t(labeled_file, rows):
    """SPEC 3 by hand: D_t = the labeled set + this round's kept pairs, chosen by the pseudo-label."""
    pseudo = [Pair([USER(r["prompt"])], *((r["response_a"], r["response_b"]) if r["pseudo_label"] == "a"
                                          else (r["response_b"], r["response_a"]))) for r in rows]
    return load_pairs(labeled_file) + pseudo


def trained_from(cfg, pairs, source, t, folder):
    """The weights of round t's training run on `pairs`, started from `source`, done here."""
    train_run(cfg, Dist(), pairs, str(folder), source, t)
    return load_file(os.path.join(folder, "model", "model.safetensors"))


def saved(cfg, t):
    return load_file(os.path.join(cfg.out_dir, f"round_{t}", "model", "model.safetensors"))


def same(w1, w2):
    return w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


def test_1_2_under_base_every_round_restarts_from_model_on_this_rounds_kept_pairs(tmp_path, pm_folder, loop_files):
    cfg, rounds = ssrm_loop(tmp_path, "base", pm_folder, loop_files, "base")
    assert [r.get("init_model") for r in rounds] == [pm_folder] * 3
    kept = [None] + [kept_rows(cfg, t) for t in (1, 2)]
    ids = [None] + [{r["pool_index"] for r in k} for k in kept[1:]]
    # the threshold keeps another subset each round, so D_2 differs from the union of the rounds' kept pairs
    assert ids[1] - ids[2] and ids[2] - ids[1], "the rounds kept the same pairs: the test would not tell"
    for t in (1, 2):
        assert rounds[t]["train_size"] == 48 + len(kept[t]) and rounds[t]["pseudo_labeled"] == len(kept[t])
        assert rounds[t]["pseudo_labeled_share"] == pytest.approx(len(kept[t]) / (48 + len(kept[t])))
    # round 2 is exactly a training run from --model on D_2, and not one from round 1's model
    pairs = d_t(cfg.train_file, kept[2])
    assert same(saved(cfg, 2), trained_from(cfg, pairs, pm_folder, 2, tmp_path / "ref"))
    assert not same(saved(cfg, 2), trained_from(cfg, pairs, os.path.join(cfg.out_dir, "round_1", "model"), 2,
                                               tmp_path / "wrong"))


def test_1_under_previous_every_round_continues_from_the_last_rounds_model(tmp_path, pm_folder, loop_files):
    cfg, rounds = ssrm_loop(tmp_path, "previous", pm_folder, loop_files, "previous")
    assert [r.get("init_model") for r in rounds] == [pm_folder, "round_0/model", "round_1/model"]
    pairs = d_t(cfg.train_file, kept_rows(cfg, 2))
    assert rounds[2]["train_size"] == len(pairs)
    assert same(saved(cfg, 2), trained_from(cfg, pairs, os.path.join(cfg.out_dir, "round_1", "model"), 2,
                                            tmp_path / "ref"))
    assert not same(saved(cfg, 2), trained_from(cfg, pairs, pm_folder, 2, tmp_path / "wrong"))


# ----------------------------------------------------------------------------- 3: the gradient is that of the mean

def encoded_pairs(kind, n=9):
    tok = toy.build_tokenizer()
    pairs = [Pair([USER(r["prompt"])], r["chosen"] + " w5" * (i % 3), r["rejected"], margin=0.1 * i)
             for i, r in enumerate(toy.make_pairs(3, n))]  # varied lengths: padding inside the micro-batches
    enc = Encoder(tok, kind, 64)
    return tok, enc, enc.encode_train(pairs, np.arange(n) % 3 == 1)


def reference_mean_loss(model, kind, examples, margin, center):
    """The mean per-pair loss over the batch, from full forwards of the plain HF model, one
    sequence at a time (no padding): SRM's cross-entropy over the vocabulary at the last
    token, or -log sigmoid(r_c - r_r - m) + c (r_c + r_r)^2."""
    losses = []
    for e in examples:
        if kind == "pm":
            logits = model.hf(input_ids=torch.tensor([e["input_ids"]])).logits[0, -1].float()
            losses.append(-torch.log_softmax(logits, -1)[e["label"]])
        else:
            rc, rr = (model.hf(input_ids=torch.tensor([e[k]])).logits[0, 0] for k in ("chosen_ids", "rejected_ids"))
            losses.append(-F.logsigmoid(rc - rr - (e["margin"] + margin)) + center * (rc + rr) ** 2)
    return torch.stack(losses).mean()


@pytest.mark.parametrize("kind", ["pm", "rm"])
def test_3_one_global_batch_backward_is_the_gradient_of_the_mean_pair_loss(kind, pm_folder, rm_folder):
    tok, enc, examples = encoded_pairs(kind)
    model, _ = load_model(make(TrainSettings, model=pm_folder if kind == "pm" else rm_folder, model_type=kind))
    params = [p for p in model.parameters() if p.requires_grad]
    margin, center = (0.0, 0.0) if kind == "pm" else (0.05, 0.01)
    expected = torch.autograd.grad(reference_mean_loss(model, kind, examples, margin, center), params)
    collate, scaler = make_collate(kind, tok, enc.label_ids), torch.amp.GradScaler("cpu", enabled=False)

    def grads(world, micro):
        model.zero_grad(set_to_none=True)
        backward_global_batch(Setup(model, model, None, params, nullcontext(), scaler, collate, world, margin, center),
                              micro, len(examples))
        return [p.grad.clone() for p in params]
    # one process, two uneven micro-batches
    for g, e in zip(grads(Dist(), [examples[:4], examples[4:]]), expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    # two ranks, each with its strided share; DDP's all-reduce averages them
    ranks = [grads(Dist(rank=r, world_size=2), [examples[r::2][:3], examples[r::2][3:]]) for r in range(2)]
    for g0, g1, e in zip(*ranks, expected):
        torch.testing.assert_close((g0 + g1) / 2, e, rtol=1e-4, atol=1e-6)


def test_3_each_step_sees_the_mean_gradient_of_its_own_global_batch(tmp_path, monkeypatch, pm_folder):
    """In the loop: 20 pairs in global batches of 16 make a full step and a step of 4 pairs;
    each optimizer step sees the gradient of the mean loss over its own batch (not the
    last step's left over, not divided by 16 for the 4). lr 0 keeps the weights, so the
    reference is autograd on the initial model."""
    from selfrm.trainer import example_length
    from selfrm.steps import encode_training
    from selfrm.trainer import global_batches
    path = write_jsonl(tmp_path / "pairs.jsonl", toy.make_pairs(4, 20))
    cfg = make(TrainSettings, model=pm_folder, train_file=path, out_dir=str(tmp_path / "run"), global_batch_size=16,
               micro_batch_size=3, lr=0.0, warmup_steps=0, grad_clip=0.0, log_every=100)
    seen, real_make = [], trainer.make_optimizer

    def recording(params, cfg, device):
        optimizer = real_make(params, cfg, device)
        real_step = optimizer.step
        optimizer.step = lambda *a, **k: (seen.append([p.grad.clone() for p in params]), real_step(*a, **k))[1]
        return optimizer
    monkeypatch.setattr(trainer, "make_optimizer", recording)
    train.main(cfg)
    model, tokenizer = load_model(cfg)
    examples, _ = encode_training(cfg, tokenizer, load_pairs(path))
    batches = global_batches([example_length(e) for e in examples], cfg, Dist(), 0)
    assert [len(b) for b in batches] == [16, 4] and len(seen) == 2
    params = [p for p in model.parameters() if p.requires_grad]
    for grads, batch in zip(seen, batches):
        expected = torch.autograd.grad(reference_mean_loss(model, "pm", [examples[i] for i in batch], 0.0, 0.0), params)
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- 4: fp16 unscales before clipping

def optimizer_grad_norms(monkeypatch, tmp_path, name, **overrides):
    """Train a few steps; return the global grad norm the optimizer sees at each step it takes,
    and the GradScaler the run used."""
    norms, scalers = [], []
    real_make = trainer.make_optimizer
    real_scaler = torch.amp.GradScaler

    def recording(params, cfg, device):
        optimizer = real_make(params, cfg, device)
        real_step = optimizer.step

        def step(*args, **kwargs):
            norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item())
            return real_step(*args, **kwargs)
        optimizer.step = step
        return optimizer

    def scaler(*args, **kwargs):
        scalers.append(real_scaler(*args, **kwargs))
        return scalers[-1]
    monkeypatch.setattr(trainer, "make_optimizer", recording)
    monkeypatch.setattr(torch.amp, "GradScaler", scaler)
    train.main(make(TrainSettings, out_dir=str(tmp_path / name), **overrides))
    monkeypatch.undo()
    return norms, scalers[0]


def test_4_fp16_gradients_are_unscaled_before_clipping(tmp_path, monkeypatch, toy_files, pm_folder):
    common = dict(model=pm_folder, train_file=toy_files[0], global_batch_size=16, micro_batch_size=8, max_steps=3,
                  lr=1e-3, warmup_steps=1, grad_clip=1e-3)  # far below this model's gradient norm: clipping acts
    fp32, _ = optimizer_grad_norms(monkeypatch, tmp_path, "fp32", dtype="fp32", **common)
    fp16, scaler = optimizer_grad_norms(monkeypatch, tmp_path, "fp16", dtype="fp16", **common)
    assert scaler.is_enabled() and scaler.get_scale() > 1  # the loss was scaled: the check is not vacuous
    assert len(fp32) == 3 and fp16, (fp32, fp16)
    assert fp32 == pytest.approx([1e-3] * 3, rel=1e-4)
    assert fp16 == pytest.approx([1e-3] * len(fp16), rel=1e-3)  # clipped in real units, as in fp32


# ----------------------------------------------------------------------------- 5: read at the label position

def plain_last_logits(hf, ids):
    return hf(input_ids=torch.tensor([ids])).logits[0, -1].float()


@pytest.mark.parametrize("kind", ["pm", "rm"])
def test_5_prob_a_is_a_hand_computation_from_full_forwards(kind, pm_folder, rm_folder):
    model, tok = load_model(make(TrainSettings, model=pm_folder if kind == "pm" else rm_folder, model_type=kind))
    model.eval()
    rows = toy.as_unlabeled(toy.make_pairs(5, 12, stream=3), 5)
    prompts = [[USER(r["prompt"] + " t1" * (i % 4))] for i, r in enumerate(rows)]  # varied lengths: padding
    enc = Encoder(tok, kind, 128)
    encoded = enc.encode_score(prompts, [r["response_a"] for r in rows], [r["response_b"] for r in rows])
    scores = score_encoded(model, encoded, tok.pad_token_id, enc.label_ids or None, Dist(), batch_size=5)
    expected, early, rewards = [], [], []
    with torch.no_grad():
        for ab, ba in encoded:
            if kind == "pm":  # SPEC 1a: (p_A(a1, a2) + p_B(a2, a1)) / 2, softmax over the A and B logits only
                ids = [enc.label_ids["A"], enc.label_ids["B"]]
                p_ab, p_ba = (plain_last_logits(model.hf, s)[ids].softmax(-1) for s in (ab, ba))
                expected.append((p_ab[0] + p_ba[1]).item() / 2)
                q_ab, q_ba = (plain_last_logits(model.hf, s[:-1])[ids].softmax(-1) for s in (ab, ba))
                early.append((q_ab[0] + q_ba[1]).item() / 2)  # what reading one token early would give
            else:  # SPEC 1b: sigmoid(r_a - r_b), each reward from its own sequence's last token
                ra, rb = (model.hf(input_ids=torch.tensor([s])).logits[0, 0].item() for s in (ab, ba))
                expected.append(1 / (1 + math.exp(-(ra - rb))))
                rewards.append((ra, rb))
    np.testing.assert_allclose(scores["prob_a"], expected, rtol=1e-5, atol=1e-6)
    if kind == "pm":
        assert np.abs(np.array(early) - expected).max() > 1e-3  # the position matters for this model
    else:
        np.testing.assert_allclose(np.stack([scores["reward_a"], scores["reward_b"]], 1), rewards, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- 6: training truncation and placement

def response_tokens(tok, ids):
    """The toy words of the two responses of one encoded pm sequence."""
    words = tok.convert_ids_to_tokens(ids)
    a, b = words.index("A]"), words.index("B]")
    return words[a + 1:b - 1], words[b + 1:]


@pytest.mark.parametrize("chosen, rejected, kept", [
    ("w1 w2 w3 w4 w5 w6", "w7 w8", (3, 2)),  # the longer loses all 3
    ("w1 w2 w3 w4 w5 w6", "w7 w8 w9 w10 w11 w12", (4, 4)),  # as long: level at L = 4 (one token unused)
    ("w7 w8 w9 w10 w11 w12", "w1 w2 w3 w4 w5 w6", (4, 4)),
], ids=["longer-chosen", "as-long-a", "as-long-b"])
def test_6_training_cuts_the_same_responses_whichever_is_placed_a(chosen, rejected, kept):
    tok = toy.build_tokenizer()
    pair = Pair([USER("t1")], chosen, rejected)
    full = Encoder(tok, "pm", 10_000).encode_train([pair], [False])[0]["input_ids"]
    enc = Encoder(tok, "pm", len(full) - 3)  # 3 tokens too long; the context (one token) keeps it
    chosen_a, chosen_b = enc.encode_train([pair, pair], [False, True])
    assert (chosen_a["label"], chosen_b["label"]) == (enc.label_ids["A"], enc.label_ids["B"])
    c_a, r_a = response_tokens(tok, chosen_a["input_ids"])
    r_b, c_b = response_tokens(tok, chosen_b["input_ids"])
    assert (c_a, r_a) == (c_b, r_b)  # the same cut, swapped
    assert c_a == chosen.split()[:len(c_a)] and r_a == rejected.split()[:len(r_a)]
    assert (len(c_a), len(r_a)) == kept  # balanced: each keeps min(its length, L), L the largest that fits


def test_6_real_pairs_are_cut_alike_in_both_placements(smollm2_tokenizer):
    from test_templates import parse_pm
    pairs = load_pairs(need_data("hh-rlhf-harmless-base-test.jsonl.gz"), bad_rows="skip")[:60]
    enc = Encoder(smollm2_tokenizer, "pm", 128)
    chosen_a = enc.encode_train(pairs, [False] * len(pairs))
    chosen_b = enc.encode_train(pairs, [True] * len(pairs))
    assert enc.truncated > 10  # pairs were cut: the check is not vacuous
    for p, x, y in zip(pairs, chosen_a, chosen_b):
        turns_a, c_a, r_a = parse_pm(smollm2_tokenizer.decode(x["input_ids"], skip_special_tokens=False))
        turns_b, r_b, c_b = parse_pm(smollm2_tokenizer.decode(y["input_ids"], skip_special_tokens=False))
        assert (turns_a, c_a, r_a) == (turns_b, c_b, r_b), p.where
        assert p.chosen.startswith(c_a) and p.rejected.startswith(r_a)


# ----------------------------------------------------------------------------- 7: SER's status details

def test_7_a_status_2_round_tags_every_selected_pair_2():
    # pairs 0 and 1 qualify for status 1 (one > 0.55, the other < 0.45) and for status 2 (|diff| > 0.3);
    # pair 2 only for status 2 (0.95 - 0.6); pair 3 for neither
    a, b = np.array([0.9, 0.2, 0.95, 0.5]), np.array([0.1, 0.8, 0.6, 0.5])
    r = learning_status(a, b, min_count=3)  # status 1: 2 pairs < 3, not met; status 2: 3 pairs, met
    assert (r.met, r.status1_count, r.status2_count) == ("status2", 2, 3)
    assert r.keep.tolist() == [True, True, True, False]
    assert r.status.tolist() == [2, 2, 2, 0]
    r = learning_status(a, b, min_count=2)  # status 1 met: only its pairs, tagged 1
    assert (r.met, r.keep.tolist(), r.status.tolist()) == ("status1", [True, True, False, False], [1, 1, 0, 0])


def test_7_min_fraction_rounds_up():
    a, b = np.array([0.9, 0.5, 0.5, 0.5]), np.array([0.1, 0.5, 0.5, 0.5])  # one pair qualifies for both
    r = learning_status(a, b, min_count=0, min_fraction=0.3)  # 0.3 of 4 pairs = 1.2: 2 are needed
    assert r.needed == 2 and r.met == "converged" and not r.keep.any()
    assert learning_status(a, b, min_count=0, min_fraction=0.25).met == "status1"  # exactly 1
    assert learning_status(a, b, min_count=0, min_fraction=0.3, mode="union").met == "converged"
    assert learning_status(a, b, min_count=3, min_fraction=0.3).needed == 3  # the larger of the two


def test_7_relabel_applies_ser_status_to_sigmoid_of_the_rewards(monkeypatch):
    """label.py and the SER rounds: the scores p = sigmoid(r) go through learning_status with
    the run's settings; each written row carries its status and the higher-scored response
    as its pseudo-label."""
    p_a, p_b = np.array([0.9, 0.2, 0.95, 0.5, 0.7]), np.array([0.1, 0.8, 0.6, 0.5, 0.35])
    logit = lambda p: np.log(p / (1 - p))
    r_a, r_b = logit(p_a), logit(p_b)
    fake = {"prob_a": 1 / (1 + np.exp(-(r_a - r_b))), "reward_a": r_a, "reward_b": r_b}
    monkeypatch.setattr(scoring, "score", lambda *args, **kwargs: fake)
    pool = [UnlabeledPair([USER("t1")], "w1", "w2", {"prompt": "t1", "response_a": "w1", "response_b": "w2"})
            for _ in p_a]
    cfg = make(TrainSettings, model_type="rm", filter="status", status_min_count=4)
    # status 1: pairs 0, 1, 4 (0.7 > 0.55, 0.35 < 0.45): 3 < 4; status 2: pairs 0, 1, 2, 4 (0.35 > 0.3): met
    rows, summary = relabel(cfg, Dist(), None, toy.build_tokenizer(), pool, ([], None))
    assert (summary["status_met"], summary["status1_count"], summary["status2_count"]) == ("status2", 3, 4)
    assert [r["status"] for r in rows] == [2, 2, 2, None, 2]
    assert [r["keep"] for r in rows] == [True, True, True, False, True]
    assert [r["pseudo_label"] for r in rows] == ["a", "b", "a", "b", "a"]
    np.testing.assert_allclose([r["score_a"] for r in rows], p_a)
    cfg = make(TrainSettings, model_type="rm", filter="status", status_min_count=3)  # now status 1 is met
    rows, summary = relabel(cfg, Dist(), None, toy.build_tokenizer(), pool, ([], None))
    assert summary["status_met"] == "status1" and [r["status"] for r in rows] == [1, 1, None, None, 1]


# ----------------------------------------------------------------------------- 8: bins just below an edge

def test_8_values_a_rounding_below_an_edge_fall_in_the_bin_the_edge_opens():
    # 1 - 0.9 is 0.09999999999999998 and 1 - 0.8 is 0.19999999999999996: the edges 0.1 and 0.2
    # up to rounding; 0.7 + 0.1 is 0.7999999999999999, the edge 0.8
    assert 1 - 0.9 < 0.1 and 1 - 0.8 < 0.2 and 0.7 + 0.1 < 0.8
    hist = calibration([1 - 0.9, 1 - 0.8, 0.7 + 0.1, 0.5])["histogram"]["counts"]
    assert hist == [0, 1, 1, 0, 0, 1, 0, 0, 1, 0]  # bins 0.1-0.2, 0.2-0.3, 0.5-0.6, 0.8-0.9
    # confidences max(P, 1 - P) just below the edges 0.8 (from either side of 0.5), 0.9 and 0.6
    probs = [0.7 + 0.1, 1 - (0.7 + 0.1), np.nextafter(0.9, 0), np.nextafter(0.6, 0)]
    confidences = [max(p, 1 - p) for p in probs]
    assert all(c < edge for c, edge in zip(confidences, [0.8, 0.8, 0.9, 0.6]))
    table = calibration(probs)["reliability"]
    assert [(row["bin"], row["count"], row["accuracy"]) for row in table] == \
        [("0.6-0.7", 1, 1.0), ("0.8-0.9", 2, 0.5), ("0.9-1.0", 1, 1.0)]


def test_8_pseudo_label_accuracy_by_confidence_bins_every_row_as_calibration_does():
    probs = np.array([0.7 + 0.1, 0.75, 0.85, 1 - (0.7 + 0.1)])
    labels = np.where(probs > 0.5, "a", "b")
    report = metrics.gold_report(probs, labels, np.array(["a"] * 4, dtype=object), np.ones(4, bool))
    bins = report["accuracy_by_confidence"]
    assert sum(b["n"] for b in bins.values()) == report["gold_rows"] == 4  # every row in one bin
    assert {k: b["n"] for k, b in bins.items()} == {"0.5-0.6": 0, "0.6-0.7": 0, "0.7-0.8": 1, "0.8-0.9": 3, "0.9-1.0": 0}


# ----------------------------------------------------------------------------- 9: RewardBench's table

# RewardBench (Lambert et al., 2024), the per-subset prompt counts of its evaluation set, section by
# section; math-prm has 447 prompts, weighted as 984 so that math counts as much as the 6 x 164 of code.
# XSTest: 250 safe prompts that should be answered, 154 of its unsafe ones that should be refused.
PUBLISHED = {
    "chat": {"alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28,
             "mt-bench-med": 40},
    "chat_hard": {"mt-bench-hard": 37, "llmbar-natural": 100, "llmbar-adver-neighbor": 134,
                  "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46},
    "safety": {"refusals-dangerous": 100, "refusals-offensive": 100, "xstest-should-refuse": 154,
               "xstest-should-respond": 250, "donotanswer": 136},
    "reasoning": {"math-prm": 984, "hep-cpp": 164, "hep-go": 164, "hep-java": 164, "hep-js": 164,
                  "hep-python": 164, "hep-rust": 164},
}


def test_9_every_subset_weighs_its_published_count():
    assert sum(len(s) for s in PUBLISHED.values()) == 23
    assert {k: dict(v) for k, v in SECTIONS.items()} == PUBLISHED
    for section, counts in PUBLISHED.items():
        total = sum(counts.values())
        for subset, n in counts.items():  # one subset right, its section's others wrong: its share of the weight
            accuracy = {s: float(s == subset) for s in counts}
            assert rewardbench_sections(accuracy)["sections"] == {section: pytest.approx(n / total)}, subset
    assert sum(PUBLISHED["reasoning"].values()) == 2 * 984 and 447 < 984  # math weighs as much as code
