"""Selection rules beyond the two papers (issue 21): order consistency, temperature
calibration, stability across rounds, soft labels and the length report. Each is checked
against a hand computation, and each run-level test fails when its rule is made a no-op."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import label
import train
from conftest import write_jsonl
from selfrm import rounds, rundir, scoring, steps, toy
from selfrm.encoding import Encoder
from selfrm.formats import Pair, UnlabeledPair, load_pairs
from selfrm.dist import Dist
from selfrm.filters import (T_BOUNDS, calibrated, confidence_filter, consistent_filter, fit_temperature,
                            learning_status, longer_share, order_disagreement, temperature_nll)
from selfrm.metrics import calibration
from selfrm.losses import pairwise_loss, srm_loss
from selfrm.modeling import load_model
from selfrm.scoring import relabel, score_encoded
from selfrm.settings import LabelSettings, SettingsError, TrainSettings, make

USER = lambda text: {"role": "user", "content": text}
FAST = dict(lr=3e-3, warmup_steps=1, global_batch_size=16, micro_batch_size=8, log_every=100, epochs=1)
sigmoid = lambda x: 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))


def fake_pool(n, lengths=None):
    """n pool pairs of the toy vocabulary; lengths[i] = (words of a1, words of a2)."""
    lengths = lengths or [(3, 3)] * n
    return [UnlabeledPair([USER("t1")], " ".join(["w1"] * la), " ".join(["w2"] * lb),
                          {"prompt": "t1", "response_a": "x", "response_b": "y"}, gold=None) for la, lb in lengths]


def relabel_with(monkeypatch, scores, model_type, pool, **kwargs):
    """relabel() on given scores (score() patched): no model involved."""
    monkeypatch.setattr(scoring, "score", lambda *args, **kw: scores)
    options = {k: kwargs.pop(k) for k in ("temperature", "previous") if k in kwargs}
    cfg = make(TrainSettings, model_type=model_type, **kwargs)
    return relabel(cfg, Dist(), None, toy.build_tokenizer(), pool, ([], None), **options)


def pm_scores(orders):
    orders = np.array(orders, dtype=np.float64)
    return {"prob_a": orders.mean(1), "prob_a_orders": orders}


ORDERS = [[0.9, 0.85], [0.9, 0.3], [0.2, 0.1], [0.6, 0.55], [0.45, 0.7]]  # pairs 1 and 4: the orders disagree


# ----------------------------------------------------------------------------- 1: order consistency

def test_consistent_filter_keeps_pairs_whose_orders_agree_and_pass_the_threshold():
    orders = np.array(ORDERS)
    p = orders.mean(1)  # 0.875, 0.6, 0.15, 0.575, 0.575
    assert order_disagreement(orders).tolist() == [False, True, False, False, True]
    assert consistent_filter(orders, p, 0.8).tolist() == [True, False, True, False, False]
    # at 0.55 the confidence filter keeps all five; consistency drops the two that disagree
    assert confidence_filter(p, 0.55).all()
    assert consistent_filter(orders, p, 0.55).tolist() == [True, False, True, True, False]


def test_relabel_with_consistent_filter_and_order_disagreement(monkeypatch):
    rows, summary = relabel_with(monkeypatch, pm_scores(ORDERS), "pm", fake_pool(5), filter="consistent", threshold=0.55)
    assert [r["keep"] for r in rows] == [True, False, True, True, False]
    assert [r["prob_a_orders"] for r in rows] == ORDERS
    assert [r["prob_a"] for r in rows] == pytest.approx(np.mean(ORDERS, 1).tolist(), abs=0)
    assert summary["order_disagreement"] == pytest.approx(2 / 5)
    # every pm labeling reports it, whatever the filter; a scalar model has no orders
    rows, summary = relabel_with(monkeypatch, pm_scores(ORDERS), "pm", fake_pool(5), filter="confidence", threshold=0.55)
    assert all(r["keep"] for r in rows) and summary["order_disagreement"] == pytest.approx(2 / 5)


def test_consistent_filter_with_a_scalar_model_is_a_settings_error(tmp_path, rm_folder, loop_files):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SettingsError, match="compares the two A/B orders"):
        label.main(make(LabelSettings, model=rm_folder, unlabeled_file=loop_files[1], out_file=str(out / "o.jsonl"),
                        filter="consistent"))
    with pytest.raises(SettingsError, match="compares the two A/B orders"):
        train.main(make(TrainSettings, model=rm_folder, model_type="rm", train_file=loop_files[0],
                        unlabeled_file=loop_files[1], filter="consistent", out_dir=str(out / "run")))
    assert not os.listdir(out)  # refused before anything was written


def test_scoring_returns_each_order_as_a_plain_forward_computes_it(pm_folder):
    """prob_a_orders[:, 0] = p_A of (a1, a2), [:, 1] = p_B of (a2, a1), each from the model's
    logits at the last token, softmaxed over A and B; prob_a is their mean."""
    cfg = make(TrainSettings, model=pm_folder, model_type="pm", max_length=64)
    model, tokenizer = load_model(cfg)
    rows = toy.make_pairs(5, 6)
    encoder = Encoder(tokenizer, "pm", 64)
    encoded = encoder.encode_score([[USER(r["prompt"])] for r in rows],
                                   [r["chosen"] for r in rows], [r["rejected"] for r in rows])
    out = score_encoded(model, encoded, tokenizer.pad_token_id, encoder.label_ids, Dist(), batch_size=4)
    a, b = encoder.label_ids["A"], encoder.label_ids["B"]
    hf = model.hf.eval()
    for i, (first, second) in enumerate(encoded):
        with torch.no_grad():
            l1 = hf(torch.tensor([first])).logits[0, -1, [a, b]].softmax(-1)
            l2 = hf(torch.tensor([second])).logits[0, -1, [a, b]].softmax(-1)
        assert out["prob_a_orders"][i] == pytest.approx([l1[0].item(), l2[1].item()], abs=1e-6)
        assert out["prob_a"][i] == pytest.approx((l1[0].item() + l2[1].item()) / 2, abs=1e-6)
    assert len(set(np.round(out["prob_a_orders"][:, 0] - out["prob_a_orders"][:, 1], 6))) > 1  # the orders differ


# ----------------------------------------------------------------------------- 2: temperature

def test_fit_temperature_finds_the_minimum_and_never_raises_the_nll():
    rng = np.random.default_rng(0)
    s = rng.normal(0, 4, 20000)  # pair logits of a model that is overconfident by a factor 2.5
    first_better = rng.random(s.size) < sigmoid(s / 2.5)
    z = np.where(first_better, s, -s)  # the logit of "the better response wins"
    t = fit_temperature(z)
    grid = np.exp(np.linspace(np.log(0.5), np.log(10), 4001))
    best = grid[np.argmin([temperature_nll(z, g) for g in grid])]
    assert t == pytest.approx(best, rel=2e-3) and t == pytest.approx(2.5, rel=0.05)
    assert temperature_nll(z, t) < temperature_nll(z, 1.0)
    nll = lambda u: np.mean(np.log1p(np.exp(-z / u)))  # by hand
    assert temperature_nll(z, t) == pytest.approx(nll(t), rel=1e-12)
    assert nll(t) <= min(nll(t * 1.01), nll(t / 1.01))
    # nothing to fit: T = 1; every pair ranked right: the NLL falls towards T = 0, T stops at its bound
    assert fit_temperature([]) == 1.0 and fit_temperature([0.0, 0.0]) == 1.0
    assert fit_temperature([0.5, 1.0, 2.0, 0.3]) == T_BOUNDS[0] == 0.05
    with pytest.raises(ValueError, match="1 of 3 pair logits are not finite"):
        fit_temperature([1.0, np.nan, 2.0])
    # a calibrated model: the fitted T is close to 1 and its NLL is no higher than T = 1's
    z1 = np.where(rng.random(s.size) < sigmoid(s), s, -s)
    assert abs(fit_temperature(z1) - 1) < 0.05 and temperature_nll(z1, fit_temperature(z1)) <= temperature_nll(z1, 1.0)


def test_temperature_one_reproduces_the_uncalibrated_labels_exactly(monkeypatch):
    r_a, r_b = np.array([2.0, -0.3, 0.9, -2.5]), np.array([0.1, 0.4, 0.2, 0.0])
    scores = {"prob_a": sigmoid(r_a - r_b), "reward_a": r_a, "reward_b": r_b}
    plain, s_plain = relabel_with(monkeypatch, scores, "rm", fake_pool(4), filter="confidence", threshold=0.6)
    one, s_one = relabel_with(monkeypatch, scores, "rm", fake_pool(4), filter="confidence", threshold=0.6,
                              temperature=1.0)
    assert one == plain and s_one == s_plain and "prob_a_calibrated" not in one[0]
    # z = 1.9, -0.7, 0.7, -2.5: at T = 1 confidences 0.870, 0.668, 0.668, 0.924 pass 0.6; at T = 2
    # 0.721, 0.587, 0.587, 0.777: the two middle pairs fall below
    hot, s_hot = relabel_with(monkeypatch, scores, "rm", fake_pool(4), filter="confidence", threshold=0.6, temperature=2.0)
    assert [r["keep"] for r in plain] == [True, True, True, True]
    assert [r["keep"] for r in hot] == [True, False, False, True] and s_hot["temperature"] == 2.0
    np.testing.assert_allclose([r["prob_a_calibrated"] for r in hot], sigmoid((r_a - r_b) / 2), rtol=1e-12)
    np.testing.assert_allclose([r["score_a"] for r in hot], sigmoid(r_a / 2), rtol=1e-12)  # SER's scores: sigmoid(r / T)
    assert [r["prob_a"] for r in hot] == [r["prob_a"] for r in plain]  # the raw probability stays in the row
    # pm: T scales the logit of the order-averaged probability
    rows, _ = relabel_with(monkeypatch, pm_scores(ORDERS), "pm", fake_pool(5), filter="confidence", temperature=0.5)
    p = np.mean(ORDERS, 1)
    np.testing.assert_allclose([r["prob_a_calibrated"] for r in rows], sigmoid(2 * np.log(p / (1 - p))), rtol=1e-9)


def test_consistent_and_status_filters_read_the_calibrated_probability(monkeypatch):
    # orders (0.95, 0.45) disagree; P = 0.70; at T = 0.5, P_T = sigmoid(2 logit(0.7)) = 0.845 passes 0.8
    # (0.8, 0.7) agree, P = 0.75 fails 0.8, P_T = 0.9 passes
    orders = [[0.95, 0.45], [0.9, 0.8], [0.8, 0.7]]
    confident, _ = relabel_with(monkeypatch, pm_scores(orders), "pm", fake_pool(3), filter="confidence", temperature=0.5)
    consistent, _ = relabel_with(monkeypatch, pm_scores(orders), "pm", fake_pool(3), filter="consistent", temperature=0.5)
    plain, _ = relabel_with(monkeypatch, pm_scores(orders), "pm", fake_pool(3), filter="consistent")
    assert [r["keep"] for r in confident] == [True, True, True]
    assert [r["keep"] for r in consistent] == [False, True, True] and [r["keep"] for r in plain] == [False, True, False]
    assert consistent[0]["confidence"] == pytest.approx(0.7 ** 2 / (0.7 ** 2 + 0.3 ** 2))
    # SER: status 1 needs one p > 0.55 and the other < 0.45; r = +-0.3 gives 0.574 / 0.426 at T = 1,
    # 0.537 / 0.463 at T = 2 (no status 1)
    r_a, r_b = np.array([0.3, 0.3]), np.array([-0.3, -0.3])
    scores = {"prob_a": sigmoid(r_a - r_b), "reward_a": r_a, "reward_b": r_b}
    status = dict(filter="status", status_min_count=2, tau_delta=0.5)
    _, s1 = relabel_with(monkeypatch, scores, "rm", fake_pool(2), **status)
    _, s2 = relabel_with(monkeypatch, scores, "rm", fake_pool(2), temperature=2.0, **status)
    assert (s1["status_met"], s1["status1_count"]) == ("status1", 2) and (s2["status_met"], s2["status1_count"]) == ("converged", 0)


def test_label_py_applies_and_records_the_temperature(tmp_path, rm_folder, loop_files):
    out = str(tmp_path / "l.jsonl")
    rows, summary = label.main(make(LabelSettings, model=rm_folder, unlabeled_file=loop_files[1], out_file=out,
                                    temperature=3.0, threshold=0.55))
    saved = json.load(open(str(tmp_path / "l.summary.json")))
    assert saved["temperature"] == 3.0 == summary["temperature"]
    p = np.array([r["prob_a"] for r in rows])
    cal = np.array([r["prob_a_calibrated"] for r in rows])
    np.testing.assert_allclose(cal, sigmoid(np.log(p / (1 - p)) / 3), atol=1e-6)
    assert [r["keep"] for r in rows] == (np.maximum(cal, 1 - cal) >= 0.55).tolist()


def capture_training(monkeypatch):
    """Record the pairs each train_run of a self-training run receives."""
    seen = []
    real = steps.train_run

    def recording(cfg, world, pairs, *args, **kwargs):
        seen.append(list(pairs))
        return real(cfg, world, pairs, *args, **kwargs)
    monkeypatch.setattr(steps, "train_run", recording)
    return seen


def uneven_lengths(folder, rows):
    """The toy rows with responses of other lengths: chosen longer in 10 rows, rejected in 5."""
    for i, r in enumerate(rows):
        if i < 10:
            r["chosen"] += " w3 w4"
        elif i < 15:
            r["rejected"] += " w5"
    return write_jsonl(folder / "lab-uneven.jsonl", rows)


def test_calibrated_run_holds_out_fits_and_labels_with_t(tmp_path, rm_folder, loop_files, monkeypatch):
    seen = capture_training(monkeypatch)
    lab = uneven_lengths(tmp_path, [json.loads(line) for line in open(loop_files[0])])
    cfg = make(TrainSettings, model=rm_folder, model_type="rm", train_file=lab, unlabeled_file=loop_files[1],
               out_dir=str(tmp_path / "run"), rounds=1, calibrate="temperature", calibration_pairs=12, threshold=0.52,
               soft_labels=True, **FAST)
    rounds = train.main(cfg)
    labeled = load_pairs(lab)
    train0 = seen[0]
    held = [p for p in labeled if p not in train0]
    assert len(train0) == 36 and len(held) == 12 and rounds[0]["train_size"] == 36
    assert not any(p in held for p in seen[1])  # round 1 trains without them too
    # the fit, recomputed from the saved round-0 model on the held-out pairs (chosen as a1)
    model, tokenizer = load_model(make(TrainSettings, model=os.path.join(cfg.out_dir, "round_0", "model"), model_type="rm",
                                       max_length=cfg.max_length))
    encoder = Encoder(tokenizer, "rm", cfg.max_length)
    ids = encoder.encode_score([p.prompt for p in held], [p.chosen for p in held], [p.rejected for p in held])
    scores = score_encoded(model, ids, tokenizer.pad_token_id, None, Dist())
    z = scores["reward_a"] - scores["reward_b"]
    t, report = rounds[0]["temperature"], rounds[0]["calibration"]
    assert report["pairs"] == 12
    assert report["nll_before"] == pytest.approx(np.mean(np.log1p(np.exp(-z))), rel=1e-5)
    assert report["nll_after"] == pytest.approx(np.mean(np.log1p(np.exp(-z / t))), rel=1e-5)
    assert report["nll_after"] <= report["nll_before"] and t != 1.0
    assert report["ece_before"] == pytest.approx(calibration(sigmoid(z))["ece"], abs=1e-5)
    assert report["ece_after"] == pytest.approx(calibration(sigmoid(z / t))["ece"], abs=1e-5)
    assert "temperature" in rounds[1] and "calibration" in rounds[1]
    # round 1 labeled the pool with round 0's T
    pool_rows = [json.loads(line) for line in open(os.path.join(cfg.out_dir, "round_1", "pool.jsonl"))]
    summary = json.load(open(os.path.join(cfg.out_dir, "round_1", "pool.summary.json")))
    assert summary["temperature"] == t
    p = np.array([r["prob_a"] for r in pool_rows])
    cal = np.array([r["prob_a_calibrated"] for r in pool_rows])
    np.testing.assert_allclose(cal, sigmoid(np.log(p / (1 - p)) / t), atol=1e-5)
    assert [r["keep"] for r in pool_rows] == (np.maximum(cal, 1 - cal) >= 0.52).tolist()
    # 4 with 2: round 1 trains each kept pair towards its calibrated probability
    kept = [r for r in pool_rows if r["keep"]]
    assert [p.prob for p in seen[1][36:]] == [max(r["prob_a_calibrated"], 1 - r["prob_a_calibrated"]) for r in kept]
    # 5: the length report; the labeled share over round 0's training pairs, in words (the toy tokenizer's tokens)
    longer = [len(p.chosen.split()) > len(p.rejected.split()) for p in train0
              if len(p.chosen.split()) != len(p.rejected.split())]
    assert rounds[1]["longer_share_labeled"] == summary["longer_share_labeled"] == pytest.approx(np.mean(longer))
    assert summary["longer_share_kept"] is None  # every pool response has 6 words: no pair differs


def test_too_many_calibration_pairs_and_rules_without_a_pool_are_settings_errors(tmp_path, rm_folder, loop_files):
    base = dict(model=rm_folder, model_type="rm", train_file=loop_files[0], out_dir=str(tmp_path / "run"), **FAST)
    with pytest.raises(SettingsError, match="--calibration_pairs=48 holds out 48 of the 48 labeled pairs"):
        train.main(make(TrainSettings, unlabeled_file=loop_files[1], calibrate="temperature", calibration_pairs=48, **base))
    with pytest.raises(SettingsError, match="--calibrate=temperature, --soft_labels act on the pseudo-labels"):
        train.main(make(TrainSettings, calibrate="temperature", soft_labels=True, **base))
    assert not os.path.exists(tmp_path / "run")


# ----------------------------------------------------------------------------- 3: stability

def test_stable_rule_drops_every_flipped_pair(monkeypatch):
    orders = [[0.9, 0.9], [0.1, 0.1], [0.95, 0.95], [0.05, 0.05], [0.9, 0.9]]  # labels a, b, a, b, a
    previous = ["a", "a", None, "b", "b"]
    rows, summary = relabel_with(monkeypatch, pm_scores(orders), "pm", fake_pool(5), previous=previous)
    assert [r["stable"] for r in rows] == [True, False, None, True, False]
    assert all(r["keep"] for r in rows) and summary["flipped"] == 2  # recorded, not applied
    rows, summary = relabel_with(monkeypatch, pm_scores(orders), "pm", fake_pool(5), previous=previous, keep_stable=True)
    assert [r["keep"] for r in rows] == [True, False, True, True, False] and summary["kept"] == 3
    rows, summary = relabel_with(monkeypatch, pm_scores(orders), "pm", fake_pool(5), previous=[None] * 5, keep_stable=True)
    assert all(r["keep"] for r in rows) and all(r["stable"] is None for r in rows) and summary["flipped"] is None
    rows, _ = relabel_with(monkeypatch, pm_scores(orders), "pm", fake_pool(5))  # label.py: no previous round
    assert "stable" not in rows[0]


def test_status_with_keep_stable_counts_only_pairs_that_did_not_flip(monkeypatch):
    a, b = np.array([0.9, 0.9, 0.1, 0.8]), np.array([0.1, 0.2, 0.9, 0.3])  # status 1 for all four
    assert learning_status(a, b, min_count=4).met == "status1"
    r = learning_status(a, b, min_count=4, eligible=np.array([True, True, False, True]))
    assert r.met == "converged" and r.status1_count == 3 and not r.keep.any()
    r = learning_status(a, b, min_count=3, eligible=np.array([True, True, False, True]))
    assert r.met == "status1" and r.keep.tolist() == [True, True, False, True]
    logit = lambda p: np.log(p / (1 - p))
    scores = {"prob_a": sigmoid(logit(a) - logit(b)), "reward_a": logit(a), "reward_b": logit(b)}
    rows, summary = relabel_with(monkeypatch, scores, "rm", fake_pool(4), filter="status", status_min_count=4,
                                 previous=["a", "a", "a", "a"], keep_stable=True)  # pair 2 (label b) flipped
    assert summary["status_met"] == "converged" and summary["kept"] == 0


class LabelingSteps:
    """rounds.self_train's steps with no model: each labeling records the previous labels it is
    given and labels every pair with the next of `labels` (one string per round); none is kept."""

    def __init__(self, labels):
        self.labeled, self.labels, self.previous = [], list(labels), []

    def train(self, t, pairs):
        return {"model": f"round_{t}/model"}

    def label(self, remaining, previous):
        self.previous.append(dict(previous))
        labels = self.labels.pop(0)
        return [{"pool_index": i, "pseudo_label": labels[i], "keep": False, "prob_a": 0.5} for i in remaining], {"kept": 0}


def finished_rounds(tmp_path, labels):
    """A run folder whose rounds 0..len(labels) finished, round t's pool labeled labels[t - 1]."""
    for t, row_labels in enumerate(labels, 1):
        rows = [{"pool_index": i, "pseudo_label": l, "keep": False, "prob_a": 0.5} for i, l in enumerate(row_labels)]
        (tmp_path / f"round_{t}").mkdir(parents=True)
        write_jsonl(tmp_path / f"round_{t}" / "pool.jsonl", rows)
        (tmp_path / f"round_{t}" / "pool.summary.json").write_text('{"kept": 0}')
    rounds = [{"round": t, "model": f"round_{t}/model"} for t in range(len(labels) + 1)]
    (tmp_path / "manifest.json").write_text(json.dumps({"rounds": rounds}))


def test_the_last_round_gives_the_temperature_and_the_previous_labels(tmp_path, monkeypatch):
    rounds_ = [{"round": 0, "temperature": 2.0}, {"round": 1}, {"round": 2, "temperature": 0.5}, {"round": 3, "status": "converged"}]
    assert rundir.last_temperature(rounds_) == 0.5 and rundir.last_temperature([{"round": 0}]) == 1.0
    pool = fake_pool(5)
    previous_labels = lambda steps_, k, remaining: [steps_.previous[k].get(i) for i in remaining]
    for finished, labels in ((["aaaaa"], ["bbabb"]), (["aaaaa", "bbabb"], ["aaaaa"])):  # resumed at round 2, round 3
        folder = tmp_path / str(len(finished))
        finished_rounds(folder, finished)
        cfg = make(TrainSettings, model_type="rm", out_dir=str(folder), rounds=len(finished) + 1)
        fake = LabelingSteps(labels)
        rounds.self_train(cfg, fake, rundir.RunDir(cfg, Dist()), pool)
        if len(finished) == 2:
            assert previous_labels(fake, 0, [1, 3, 4]) == ["b", "b", "b"]  # by pool index, from round 2's file
        else:
            assert previous_labels(fake, 0, [2, 4]) == ["a", "a"]
    cfg = make(TrainSettings, model_type="rm", out_dir=str(tmp_path / "fresh"), rounds=2)
    fake = LabelingSteps(["aaaaa", "babab"])
    real_read = rundir.read_jsonl
    monkeypatch.setattr(rundir, "read_jsonl", lambda path: pytest.fail(f"{path} read back within the run"))
    rounds.self_train(cfg, fake, rundir.RunDir(cfg, Dist()), pool)
    monkeypatch.setattr(rundir, "read_jsonl", real_read)
    assert previous_labels(fake, 0, [0, 1]) == [None, None]  # round 1 has no previous labeling
    assert previous_labels(fake, 1, [2, 4]) == ["a", "a"]  # in memory: no file read


@pytest.mark.parametrize("settings,error", [({}, None), ({"keep_stable": True}, "--keep_stable"),
                                            ({"filter": "status"}, "--filter=status")])
def test_a_finished_round_whose_pool_was_deleted_is_never_labeled_again(tmp_path, settings, error):
    """SSRM's finished rounds are not relabeled by a later model (a rerun writes nothing); SER and
    --keep_stable need the lost labels: one error that names the file."""
    finished_rounds(tmp_path, ["aaaaa", "bbabb", "ababa"])
    for t in (1, 2, 3):
        os.remove(tmp_path / f"round_{t}" / "pool.jsonl")
    before = sorted(os.listdir(tmp_path))
    cfg = make(TrainSettings, model_type="rm", out_dir=str(tmp_path), rounds=3, **settings)
    run = rundir.RunDir(cfg, Dist())
    fake = LabelingSteps([])
    if error:
        with pytest.raises(SettingsError, match=f"round_1/pool.jsonl .*missing, but round 1 finished.*{error}"):
            rounds.self_train(cfg, fake, run, fake_pool(5))
    else:
        assert len(rounds.self_train(cfg, fake, run, fake_pool(5))) == 4
    assert fake.previous == [] and sorted(os.listdir(tmp_path)) == before


def test_soft_probability_is_that_of_the_label_given_also_for_gold_labels():
    rows = [{"pool_index": 0, "keep": True, "pseudo_label": "a", "prob_a": 0.9},
            {"pool_index": 1, "keep": True, "pseudo_label": "b", "prob_a": 0.9},  # a gold label against the model
            {"pool_index": 2, "keep": True, "pseudo_label": "b", "prob_a": 0.3, "prob_a_calibrated": 0.2},
            {"pool_index": 3, "keep": False, "pseudo_label": "a", "prob_a": 0.6}]
    assert rounds.kept_pairs(rows) == {0: ("a", 0.9), 1: ("b", pytest.approx(0.1)), 2: ("b", 0.8)}


LOOP = dict(FAST, rounds=2, threshold=0.505)  # a weak model: its confidences straddle 0.505 and labels flip


def test_stable_and_soft_rules_in_a_run(tmp_path, pm_folder, loop_files, monkeypatch):
    seen = capture_training(monkeypatch)
    cfg = make(TrainSettings, model=pm_folder, model_type="pm", train_file=loop_files[0], unlabeled_file=loop_files[1],
               out_dir=str(tmp_path / "run"), keep_stable=True, soft_labels=True, **LOOP)
    train.main(cfg)
    read = lambda t: [json.loads(line) for line in open(os.path.join(cfg.out_dir, f"round_{t}", "pool.jsonl"))]
    one, two = read(1), read(2)
    assert all(r["stable"] is None for r in one)
    assert [r["stable"] for r in two] == [a["pseudo_label"] == b["pseudo_label"] for a, b in zip(one, two)]
    flipped = [r for r in two if not r["stable"]]
    assert flipped and not any(r["keep"] for r in flipped)  # some flipped, and none of them was kept
    assert [r["keep"] for r in two] == [r["stable"] and r["confidence"] >= 0.505 for r in two]
    # 4: soft labels: round t trains each kept pair towards its confidence; gold pairs at 1
    for t, rows in ((1, one), (2, two)):
        pairs = seen[t]
        assert [p.prob for p in pairs[:48]] == [1.0] * 48
        kept = [r for r in rows if r["keep"]]
        assert [p.prob for p in pairs[48:]] == [r["confidence"] for r in sorted(kept, key=lambda r: r["pool_index"])]
        assert max(p.prob for p in pairs[48:]) < 0.6  # really soft: this weak model is unsure


# ----------------------------------------------------------------------------- 4: soft labels

def test_soft_pairwise_loss_by_hand_and_p_one_is_the_hard_loss_bit_for_bit():
    c = torch.tensor([1.5, -0.2, 0.3], requires_grad=True)
    r = torch.tensor([0.5, 0.4, 0.3], requires_grad=True)
    p = torch.tensor([0.8, 0.6, 0.9])
    d = (c - r).detach().double()
    hand = -(p.double() * F.logsigmoid(d) + (1 - p.double()) * F.logsigmoid(-d))
    assert torch.allclose(pairwise_loss(c, r, probs=p).double(), hand, atol=1e-6)
    hard = pairwise_loss(c, r, margins=torch.tensor([0.1, 0.0, -0.2]), center_coefficient=0.01)
    soft = pairwise_loss(c, r, margins=torch.tensor([0.1, 0.0, -0.2]), center_coefficient=0.01, probs=torch.ones(3))
    assert torch.equal(hard, soft)
    m = torch.tensor([0.5, 0.5, 0.5])  # with a margin, the better response of either label must lead by m
    hand = -(p.double() * F.logsigmoid(d - 0.5) + (1 - p.double()) * F.logsigmoid(-d - 0.5))
    assert torch.allclose(pairwise_loss(c, r, margins=m, probs=p).double(), hand, atol=1e-6)
    g_hard = torch.autograd.grad(hard.sum(), [c, r])
    g_soft = torch.autograd.grad(soft.sum(), [c, r])
    assert all(torch.equal(a, b) for a, b in zip(g_hard, g_soft))


def test_soft_srm_loss_by_hand_and_p_one_is_the_hard_loss_bit_for_bit():
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0), requires_grad=True)
    labels, other = torch.tensor([2, 5, 2]), torch.tensor([5, 2, 5])
    p = torch.tensor([0.7, 0.55, 1.0])
    log_pi = logits.detach().double().log_softmax(-1)
    hand = -(p.double() * log_pi[range(3), labels] + (1 - p.double()) * log_pi[range(3), other])
    assert torch.allclose(srm_loss(logits, labels, other, p).double(), hand, atol=1e-6)
    hard, soft = srm_loss(logits, labels), srm_loss(logits, labels, other, torch.ones(3))
    assert torch.equal(hard, soft)
    assert torch.equal(torch.autograd.grad(hard.sum(), logits)[0], torch.autograd.grad(soft.sum(), logits)[0])


@pytest.mark.parametrize("kind", ["pm", "rm"])
def test_soft_labels_leave_a_gold_only_run_unchanged_bit_for_bit(tmp_path, kind, pm_folder, rm_folder, loop_files):
    weights = []
    for soft in (False, True):
        cfg = make(TrainSettings, model=pm_folder if kind == "pm" else rm_folder, model_type=kind,
                   train_file=loop_files[0], unlabeled_file=loop_files[1], out_dir=str(tmp_path / f"{soft}"), rounds=0,
                   soft_labels=soft, **FAST)
        train.main(cfg)
        weights.append(load_file(os.path.join(cfg.out_dir, "round_0", "model", "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# ----------------------------------------------------------------------------- 5: the length report

def test_longer_share_by_hand(monkeypatch):
    assert longer_share([5, 3, 4, 2], [3, 5, 4, 1]) == pytest.approx(2 / 3)  # the tie (4, 4) is left out
    assert longer_share([4], [4]) is None
    # kept pseudo-labels, lengths in the tokenizer's tokens: pair 0 prefers a (5 > 3 words), pair 1 prefers b
    # (2 < 6: the shorter), pair 2 prefers a (4 > 1), pair 3 is not kept
    orders = [[0.9, 0.9], [0.1, 0.1], [0.9, 0.9], [0.6, 0.6]]
    rows, summary = relabel_with(monkeypatch, pm_scores(orders), "pm", fake_pool(4, [(5, 3), (6, 2), (4, 1), (9, 1)]))
    assert [r["keep"] for r in rows] == [True, True, True, False]
    assert summary["longer_share_kept"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("kind", ["rm", "pm"])
def test_soft_labels_reach_the_training_loss(tmp_path, kind, pm_folder, rm_folder):
    """One step on 8 pairs of p = 0.6: the logged loss is the soft loss of the initial model,
    computed here from the plain forward (and not the hard loss)."""
    folder = rm_folder if kind == "rm" else pm_folder
    rows = toy.make_pairs(3, 8)
    pairs = [Pair([USER(r["prompt"])], r["chosen"], r["rejected"], prob=0.6) for r in rows]
    cfg = make(TrainSettings, model=folder, model_type=kind, out_dir=str(tmp_path), soft_labels=True, max_steps=1,
               global_batch_size=8, micro_batch_size=8, log_every=1, lr=1e-3, warmup_steps=0)
    _, _, summary = steps.train_run(cfg, Dist(), pairs, str(tmp_path / "run"), folder, score=False)
    model, tokenizer = load_model(cfg, folder)
    model.eval()
    encoder = Encoder(tokenizer, kind, cfg.max_length)
    examples = encoder.encode_train(pairs, steps.placement(cfg, len(pairs), 0))
    with torch.no_grad():
        if kind == "rm":
            reward = lambda ids: model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()
            d = np.array([reward(e["chosen_ids"]) - reward(e["rejected_ids"]) for e in examples])
            log_right, log_wrong = -np.log1p(np.exp(-d)), -np.log1p(np.exp(d))
        else:  # log pi over the whole vocabulary at the label position, of the label and of the other token
            a, b = encoder.label_ids["A"], encoder.label_ids["B"]
            log_pi = [model.hf(torch.tensor([e["input_ids"]])).logits[0, -1].double().log_softmax(-1) for e in examples]
            log_right = np.array([lp[e["label"]].item() for lp, e in zip(log_pi, examples)])
            log_wrong = np.array([lp[b if e["label"] == a else a].item() for lp, e in zip(log_pi, examples)])
    soft = np.mean(-(0.6 * log_right + 0.4 * log_wrong))
    assert summary["train_loss"] == pytest.approx(soft, rel=1e-5)
    assert abs(np.mean(-log_right) - soft) > 1e-3  # the hard loss differs: the test can tell them apart


def test_settings_errors_of_the_demo_come_before_any_write(tmp_path):
    out = tmp_path / "demo"
    with pytest.raises(SettingsError, match="--calibration_pairs=250 holds out 250 of the 250 labeled pairs"):
        train.main(train.settings_from_argv(["--calibrate=temperature", "--calibration_pairs=250", f"--out_dir={out}"]))
    assert not out.exists()


def test_a_run_saved_before_a_setting_existed_still_resumes(tmp_path):
    """settings.json of a run from before these rules: it lacks them, and they were off."""
    cfg = make(TrainSettings, model_type="rm", out_dir=str(tmp_path))
    saved = {k: v for k, v in dataclasses.asdict(cfg).items()
             if k not in ("calibrate", "calibration_pairs", "keep_stable", "soft_labels")}
    (tmp_path / "settings.json").write_text(json.dumps(saved))
    (tmp_path / "manifest.json").write_text(json.dumps({"final_model": "model", "rounds": [{"round": 0}]}))
    assert rundir.finished_run(cfg) == "model"
    rundir.claim_out_dir(cfg, Dist(), {})  # no "other settings" error
    assert rundir.finished_run(make(TrainSettings, model_type="rm", out_dir=str(tmp_path), soft_labels=True)) is None
