"""Filters, label.py and the self-training loop (issue: relabeling and both filters)."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import label
import train
from conftest import run_one_and_two_ranks, write_jsonl
from selfrm import toy, trainer
from selfrm.encoding import Encoder
from selfrm.formats import load_pairs
from selfrm.dist import Dist
from selfrm.filters import confidence_filter, learning_status, pseudo_label
from selfrm.modeling import load_model
from selfrm.scoring import score_encoded
from selfrm.metrics import gold_report
from selfrm.settings import LabelSettings, SettingsError, TrainSettings, make

FAST = dict(lr=3e-3, warmup_steps=1, global_batch_size=16, micro_batch_size=8, log_every=100, epochs=1)


# ----------------------------------------------------------------------------- filters by hand

def test_pseudo_label_and_confidence_filter_at_the_boundaries():
    p = np.array([0.8, 0.2, 0.79, 0.21, 0.5, 0.95, 0.05, 0.81])
    assert pseudo_label(p).tolist() == ["a", "b", "a", "b", "b", "a", "b", "a"]
    assert confidence_filter(p, 0.8).tolist() == [True, True, False, False, False, True, True, True]
    assert confidence_filter(p, 0.5).all()


def test_learning_status_sequential_by_hand():
    a = np.array([0.56, 0.55, 0.90, 0.44, 0.70, 0.50, 0.50])
    b = np.array([0.44, 0.40, 0.45, 0.56, 0.30, 0.20, 0.50])
    # status 1: (0.56, 0.44) yes; 0.55 is not > 0.55; 0.45 is not < 0.45; (0.44, 0.56) yes; (0.70, 0.30) yes
    # status 2: |diff| > 0.3: 0.45 yes, 0.40 yes, 0.30 (0.5 - 0.2, on the boundary) no
    r = learning_status(a, b, min_count=3)
    assert (r.status1_count, r.status2_count, r.met) == (3, 2, "status1")
    assert r.keep.tolist() == [True, False, False, True, True, False, False]
    assert r.status.tolist() == [1, 0, 0, 1, 1, 0, 0]
    r = learning_status(a, b, min_count=4)  # status 1 not met: status 2 (2 pairs) is not either
    assert r.met == "converged" and not r.keep.any()
    r = learning_status(a, b, min_count=2, tau_high=0.95)  # no status 1 pair: status 2 decides
    assert r.met == "status2" and r.keep.tolist() == [False, False, True, False, True, False, False]
    assert r.status.tolist() == [0, 0, 2, 0, 2, 0, 0]


def test_learning_status_min_fraction_and_union():
    a = np.array([0.56, 0.90, 0.44, 0.50])
    b = np.array([0.44, 0.45, 0.56, 0.50])
    assert learning_status(a, b, min_count=1, min_fraction=0.5).needed == 2
    assert learning_status(a, b, min_count=1, min_fraction=0.75).needed == 3
    r = learning_status(a, b, min_count=3, mode="union")  # s1 = {0, 2}, s2 = {1}: 3 in all
    assert r.met == "union" and r.keep.tolist() == [True, True, True, False] and r.status.tolist() == [1, 2, 1, 0]
    assert learning_status(a, b, min_count=4, mode="union").met == "converged"


def test_gold_report_by_hand():
    prob_a = np.array([0.55, 0.65, 0.95, 0.05, 0.3, 0.9])
    labels = pseudo_label(prob_a)  # a a a b b a
    gold = np.array(["a", "b", "a", "b", None, "b"], dtype=object)
    keep = confidence_filter(prob_a, 0.8)  # rows 2, 3, 5
    report = gold_report(prob_a, labels, gold, keep)
    assert report["gold_rows"] == 5
    assert report["pseudo_label_accuracy"] == pytest.approx(3 / 5)
    assert report["pseudo_label_accuracy_kept"] == pytest.approx(2 / 3)
    bins = report["accuracy_by_confidence"]
    assert bins["0.5-0.6"] == {"n": 1, "accuracy": 1.0}
    assert bins["0.6-0.7"] == {"n": 1, "accuracy": 0.0}
    assert bins["0.9-1.0"] == {"n": 3, "accuracy": pytest.approx(2 / 3)}
    assert gold_report(prob_a, labels, np.array([None] * 6, dtype=object), keep) == {}


# ----------------------------------------------------------------------------- scoring

def _pool(n=40, seed=1):
    return toy.as_unlabeled(toy.make_pairs(seed, n, stream=5), seed)


@pytest.mark.parametrize("kind", ["pm", "rm"])
def test_swapping_a_pair_gives_one_minus_prob_and_batching_changes_nothing(kind, pm_folder, rm_folder):
    cfg = make(TrainSettings, model=pm_folder if kind == "pm" else rm_folder, model_type=kind)
    model, tok = load_model(cfg)
    enc = Encoder(tok, kind, 128)
    rows = _pool()
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    a = [r["response_a"] + " w3" * (i % 5) for i, r in enumerate(rows)]  # varied lengths
    b = [r["response_b"] for r in rows]
    ids = enc.encode_score(prompts, a, b)
    score = lambda e, bs: score_encoded(model, e, tok.pad_token_id, enc.label_ids or None, Dist(), bs)["prob_a"]
    batched, one_by_one = score(ids, 7), score(ids, 1)
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-5, atol=1e-6)
    swapped = score(enc.encode_score(prompts, b, a), 7)
    np.testing.assert_allclose(swapped, 1 - batched, rtol=1e-5, atol=1e-6)
    assert np.std(batched) > 0  # a random model still tells pairs apart: the check is not vacuous


# ----------------------------------------------------------------------------- label.py

@pytest.fixture(scope="module")
def pool_file(tmp_path_factory):
    rows = _pool(48)
    for i, r in enumerate(rows):
        r["id"] = f"x{i}"
    return write_jsonl(tmp_path_factory.mktemp("pool") / "pool.jsonl", rows)


def test_label_writes_every_row_in_order_with_scores(tmp_path, rm_folder, pool_file):
    out = str(tmp_path / "labeled.jsonl")
    rows, summary = label.main(make(LabelSettings, model=rm_folder, unlabeled_file=pool_file, out_file=out,
                                    filter="status", status_min_count=1, tau_delta=0.0001, tau_high=0.5, tau_low=0.5))
    written = [json.loads(line) for line in open(out)]
    inputs = [json.loads(line) for line in open(pool_file)]
    assert [r["id"] for r in written] == [r["id"] for r in inputs]
    for w, i in zip(written, inputs):
        assert {k: w[k] for k in i} == i  # input fields untouched
        assert w["confidence"] == pytest.approx(max(w["prob_a"], 1 - w["prob_a"]))
        assert w["pseudo_label"] == ("a" if w["prob_a"] > 0.5 else "b")
        assert w["prob_a"] == pytest.approx(1 / (1 + np.exp(-(np.log(w["score_a"] / (1 - w["score_a"])) -
                                                               np.log(w["score_b"] / (1 - w["score_b"]))))), rel=1e-6)
        assert w["keep"] == (w["status"] is not None)
    saved = json.load(open(tmp_path / "labeled.summary.json"))
    assert saved == json.loads(json.dumps(summary)) and saved["rows"] == 48
    assert saved["kept"] == sum(w["keep"] for w in written)
    assert saved["pseudo_label_accuracy"] == pytest.approx(np.mean([w["pseudo_label"] == w["label"] for w in written]))


def test_status_filter_with_a_pairwise_model_is_a_clear_error(tmp_path, pm_folder, pool_file, loop_files):
    with pytest.raises(SettingsError, match="needs a score per response"):
        label.main(make(LabelSettings, model=pm_folder, unlabeled_file=pool_file, out_file=str(tmp_path / "o.jsonl"),
                        filter="status"))
    assert not os.listdir(tmp_path)  # refused before anything was written
    with pytest.raises(SettingsError, match="needs a score per response"):  # train.py: before the run folder is made
        train.main(make(TrainSettings, model=pm_folder, model_type="pm", train_file=loop_files[0],
                        unlabeled_file=pool_file, filter="status", out_dir=str(tmp_path / "run")))
    assert not os.listdir(tmp_path)


def test_model_type_comes_from_the_checkpoint(pm_folder, rm_folder):
    from selfrm.modeling import model_type_of
    assert (model_type_of(pm_folder), model_type_of(rm_folder)) == ("pm", "rm")


def test_emitted_pairs_train_again(tmp_path, pm_folder, pool_file):
    out = str(tmp_path / "pairs.jsonl")
    label.main(make(LabelSettings, model=pm_folder, unlabeled_file=pool_file, out_file=out, threshold=0.5, emit="pairs"))
    pairs = load_pairs(out)
    rows = [json.loads(line) for line in open(pool_file)]
    assert len(pairs) == 48 and all({p.chosen, p.rejected} == {r["response_a"], r["response_b"]} for p, r in zip(pairs, rows))
    record = train.main(make(TrainSettings, model=pm_folder, train_file=out, out_dir=str(tmp_path / "t"), **FAST))
    assert record["train_size"] == 48


def test_two_rank_labeling_writes_the_same_file(tmp_path, pm_folder, pool_file):
    args = [f"--model={pm_folder}", f"--unlabeled_file={pool_file}", "--batch_size=5"]
    run_one_and_two_ranks("label.py", args, "out_file", tmp_path / "one.jsonl", tmp_path / "two.jsonl", 29534)
    one = [json.loads(line) for line in open(tmp_path / "one.jsonl")]
    two = [json.loads(line) for line in open(tmp_path / "two.jsonl")]
    assert len(one) == len(two) == 48
    for r1, r2 in zip(one, two):
        assert {k: v for k, v in r1.items() if not isinstance(v, float)} == {k: v for k, v in r2.items() if not isinstance(v, float)}
        assert r2["prob_a"] == pytest.approx(r1["prob_a"], abs=1e-6)


# ----------------------------------------------------------------------------- the loop

def loop(tmp_path, name, files, **overrides):
    lab, pool, ev = files
    cfg = make(TrainSettings, train_file=lab, unlabeled_file=pool, eval_file=ev, out_dir=str(tmp_path / name),
               **{**FAST, **overrides})
    return cfg, train.main(cfg)


def test_ssrm_loop_builds_d_t_from_this_rounds_kept_pairs(tmp_path, pm_folder, loop_files):
    cfg, rounds = loop(tmp_path, "ssrm", loop_files, model=pm_folder, rounds=2, threshold=0.5)
    manifest = json.load(open(os.path.join(cfg.out_dir, "manifest.json")))
    assert [r["round"] for r in manifest["rounds"]] == [0, 1, 2] and manifest["final_model"] == "round_2/model"
    for r in manifest["rounds"][1:]:
        assert r["kept"] == r["pool_size"] == 80  # threshold 0.5 keeps every pair, recomputed each round
        assert r["train_size"] == 48 + 80 and r["pseudo_labeled_share"] == pytest.approx(80 / 128)
        assert 0 <= r["pseudo_label_accuracy"] <= 1 and 0 <= r["eval_accuracy"] <= 1
        labeled = [json.loads(line) for line in open(os.path.join(cfg.out_dir, f"round_{r['round']}", "pool.jsonl"))]
        assert r["pseudo_label_accuracy"] == pytest.approx(np.mean([x["pseudo_label"] == x["label"] for x in labeled]))
    assert os.path.exists(os.path.join(cfg.out_dir, "round_2", "model", "model.safetensors"))


def test_ser_loop_accumulates_and_stops_when_converged(tmp_path, rm_folder, loop_files):
    # a status needs 30 pairs; with tau_delta tiny, status 2 selects, and the pool shrinks
    cfg, rounds = loop(tmp_path, "ser", loop_files, model=rm_folder, model_type="rm", filter="status", rounds=5,
                       status_min_count=30, tau_high=0.99, tau_low=0.01, tau_delta=1e-6)
    pool_sizes = [r["pool_size"] for r in rounds[1:]]
    assert pool_sizes[0] == 80 and all(b == a - k for a, b, k in zip(pool_sizes, pool_sizes[1:], [r["kept"] for r in rounds[1:]]))
    trained = [r for r in rounds[1:] if r.get("status") != "converged"]
    assert [r["train_size"] for r in trained] == [48 + sum(x["kept"] for x in trained[:i + 1]) for i in range(len(trained))]
    assert rounds[-1]["status"] == "converged" and "model" not in rounds[-1]  # recorded, no new model
    assert len(rounds) < 6  # it stopped before the 5 rounds ran out
    manifest = json.load(open(os.path.join(cfg.out_dir, "manifest.json")))
    assert manifest["final_model"] == rounds[-2]["model"]
    last = json.load(open(os.path.join(cfg.out_dir, f"round_{rounds[-1]['round']}", "pool.summary.json")))
    assert last["kept_share"] == (last["kept"] / last["rows"] if last["rows"] else 0.0)  # no NaN in the JSON


def test_gold_labels_never_change_what_is_trained(tmp_path, pm_folder, loop_files):
    lab, pool, ev = loop_files
    rows = [json.loads(line) for line in open(pool)]
    flipped = write_jsonl(tmp_path / "flipped.jsonl", [{**r, "label": "b" if r["label"] == "a" else "a"} for r in rows])
    common = dict(model=pm_folder, rounds=1, threshold=0.51)  # keeps about half of this weak model's pool
    cfg1, r1 = loop(tmp_path, "gold", loop_files, **common)
    cfg2, r2 = loop(tmp_path, "flipped", (lab, flipped, ev), **common)
    p1 = [json.loads(line)["pseudo_label"] for line in open(os.path.join(cfg1.out_dir, "round_1", "pool.jsonl"))]
    p2 = [json.loads(line)["pseudo_label"] for line in open(os.path.join(cfg2.out_dir, "round_1", "pool.jsonl"))]
    assert p1 == p2
    assert 0 < r1[1]["kept"] < r1[1]["pool_size"]  # the filter did choose: the check below is not vacuous
    w1, w2 = (load_file(os.path.join(c.out_dir, "round_1", "model", "model.safetensors")) for c in (cfg1, cfg2))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert r1[1]["pseudo_label_accuracy"] == pytest.approx(1 - r2[1]["pseudo_label_accuracy"])  # only the report moves


def test_killed_loop_resumes_to_the_same_manifest(tmp_path, pm_folder, loop_files, monkeypatch):
    common = dict(model=pm_folder, rounds=2, threshold=0.5, save_every=2)
    cfg, straight = loop(tmp_path, "straight", loop_files, **common)
    real_lr_at = trainer.lr_at
    calls = {"n": 0}

    def killed_in_round_2(step, total, c):  # round 0: 3 steps, round 1: 8; die at round 2's step 3
        calls["n"] += 1
        if calls["n"] == 3 + 8 + 3:
            raise KeyboardInterrupt("killed")
        return real_lr_at(step, total, c)
    monkeypatch.setattr(trainer, "lr_at", killed_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        loop(tmp_path, "killed", loop_files, **common)
    out = tmp_path / "killed"
    assert [r["round"] for r in json.load(open(out / "manifest.json"))["rounds"]] == [0, 1]
    assert (out / "round_2" / "checkpoint" / "state.pt").exists()
    monkeypatch.setattr(trainer, "lr_at", real_lr_at)
    round_1_model = os.path.getmtime(out / "round_1" / "model" / "model.safetensors")
    _, resumed = loop(tmp_path, "killed", loop_files, **common)
    assert os.path.getmtime(out / "round_1" / "model" / "model.safetensors") == round_1_model  # not redone
    drop = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
    assert drop(resumed) == drop(straight)
    w1 = load_file(str(out / "round_2" / "model" / "model.safetensors"))
    w2 = load_file(os.path.join(cfg.out_dir, "round_2", "model", "model.safetensors"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
