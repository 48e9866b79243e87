"""The built-in demo: the toy task's generator and a shortened `python train.py`."""
import json
import os

import train
from selfrm import toy


def test_generator_is_deterministic_per_seed():
    assert toy.make_pairs(3, 50) == toy.make_pairs(3, 50)
    assert toy.make_pairs(3, 50) != toy.make_pairs(4, 50)
    assert toy.make_pairs(3, 50, stream=1) != toy.make_pairs(3, 50, stream=2)  # train and eval are separate draws


def test_labels_follow_the_documented_rule():
    for seed in (0, 1):
        for row in toy.make_pairs(seed, 300):
            assert toy.quality(row["chosen"], seed) > toy.quality(row["rejected"], seed)
            assert len(row["chosen"].split()) == 6 and len(row["prompt"].split()) == 3
        pool = toy.as_unlabeled(toy.make_pairs(seed, 100), seed)
        for row in pool:
            winner = row["response_a"] if row["label"] == "a" else row["response_b"]
            loser = row["response_b"] if row["label"] == "a" else row["response_a"]
            assert toy.quality(winner, seed) > toy.quality(loser, seed)
        assert 30 < sum(r["label"] == "a" for r in pool) < 70  # A/B placement is random


def test_the_pool_holds_words_the_labeled_share_barely_shows():
    """What self-training can learn from: rare words, seen at most twice among the labeled
    pairs, that the pool shows many times."""
    from collections import Counter
    rows = toy.make_pairs(0, toy.DEMO_SIZES["labeled"] + toy.DEMO_SIZES["pool"])
    labeled, pool = rows[:toy.DEMO_SIZES["labeled"]], rows[toy.DEMO_SIZES["labeled"]:]
    counts = lambda rs: Counter(w for r in rs for w in (r["chosen"] + " " + r["rejected"]).split())
    in_labeled, in_pool = counts(labeled), counts(pool)
    rare = {w for w in in_pool if in_labeled[w] <= 2}
    assert len(rare) >= 20  # of 192 words
    assert sum(in_pool[w] for w in rare) > 5 * sum(in_labeled[w] for w in rare)
    with_rare = [r for r in pool if set((r["chosen"] + " " + r["rejected"]).split()) & rare]
    assert len(with_rare) > 0.25 * len(pool)


def test_short_demo_writes_the_manifest(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(toy, "DEMO_SIZES", {"labeled": 64, "pool": 128, "eval": 64})
    out = tmp_path / "demo"
    rounds = train.main(train.settings_from_argv([f"--out_dir={out}", "--rounds=1", "--epochs=2"]))
    manifest = json.load(open(out / "manifest.json"))
    assert [r["round"] for r in manifest["rounds"]] == [0, 1] and manifest["final_model"] == "round_1/model"
    assert manifest["supervised"]["train_size"] == 64 + 128 and rounds[-1]["round"] == "full"
    for key in ("train_size", "pseudo_labeled_share", "pseudo_label_accuracy", "eval_accuracy", "seconds"):
        assert key in manifest["rounds"][1], key
    assert manifest["rounds"][1]["train_size"] == 64 + manifest["rounds"][1]["kept"]
    settings = json.load(open(out / "settings.json"))
    assert settings["model"] == "toy" and settings["epochs"] == 2 and settings["lr"] == toy.demo_defaults()["lr"]
    assert sorted(os.listdir(out / "data")) == ["eval.jsonl", "full.jsonl", "labeled.jsonl", "pool.jsonl"]
    # a rerun of the finished demo says so on its first line, not the demo's introduction
    capsys.readouterr()
    train.main(train.settings_from_argv([f"--out_dir={out}", "--rounds=1", "--epochs=2"]))
    assert capsys.readouterr().out.splitlines()[0] == (
        f"{out} holds this run, finished: its final model is {out / 'round_1/model'}; its results follow (nothing is "
        f"trained again)")
