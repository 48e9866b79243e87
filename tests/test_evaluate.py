"""evaluate.py and the metrics (issue: evaluate)."""
import json
import math

import numpy as np
import pytest

import evaluate
from conftest import run_one_and_two_ranks, write_jsonl
from selfrm import toy
from selfrm.metrics import calibration, pair_correct, rewardbench_sections
from selfrm.settings import EvalSettings, make


def test_sections_use_rewardbench_example_counts():
    acc = {"alpacaeval-easy": 0.9, "mt-bench-easy": 0.5,  # chat: (0.9*100 + 0.5*28) / 128
           "mt-bench-hard": 0.4, "llmbar-natural": 0.8,  # chat hard: (0.4*37 + 0.8*100) / 137
           "donotanswer": 0.3,  # safety: one subset
           "math-prm": 0.6, "hep-go": 1.0, "hep-rust": 0.0}  # reasoning: (0.6*984 + 164) / 1312
    out = rewardbench_sections(acc)
    expected = {"chat": (90 + 14) / 128, "chat_hard": (14.8 + 80) / 137, "safety": 0.3,
                "reasoning": (0.6 * 984 + 164) / 1312}
    assert out["sections"] == pytest.approx(expected)
    assert out["mean_of_sections"] == pytest.approx(sum(expected.values()) / 4)
    assert "leaderboard_score" not in out
    acc.update(anthropic_helpful=0.7, shp=0.5)
    out = rewardbench_sections(acc)
    assert out["prior_sets"] == pytest.approx(0.6)
    assert out["leaderboard_score"] == pytest.approx((2 * sum(expected.values()) + 0.6) / 9)
    assert rewardbench_sections({"all": 0.7}) == {"sections": {}}
    assert set(rewardbench_sections({"donotanswer": 1.0})["sections"]) == {"safety"}


def test_ece_brier_nll_by_hand():
    p = np.array([0.95, 0.85, 0.15, 0.55, 0.45, 0.5])
    c = calibration(p)
    # confidences: .95 .85 .85 .55 .55 .5 ; right: 1 1 0 1 0 0.5
    # bin 0.5-0.6: conf mean (.55+.55+.5)/3 = .5333, acc (1+0+.5)/3 = .5 -> |.0333| * 3/6
    # bin 0.8-0.9: conf .85, acc .5 -> .35 * 2/6 ; bin 0.9-1.0: conf .95, acc 1 -> .05 * 1/6
    assert c["ece"] == pytest.approx(abs(0.5 - 1.6 / 3) * 3 / 6 + 0.35 * 2 / 6 + 0.05 / 6)
    assert c["brier"] == pytest.approx(np.mean([(1 - x) ** 2 for x in p]))
    assert c["nll"] == pytest.approx(np.mean([-math.log(x) for x in p]))
    assert [(r["bin"], r["count"]) for r in c["reliability"]] == [("0.5-0.6", 3), ("0.8-0.9", 2), ("0.9-1.0", 1)]
    assert c["histogram"]["counts"] == [0, 1, 0, 0, 1, 2, 0, 0, 1, 1]


def test_tie_rules_of_both_kinds():
    pm = pair_correct({"prob_a": np.array([0.7, 0.5, 0.3])}, "pm")
    assert pm.tolist() == [1.0, 0.5, 0.0]
    rm = pair_correct({"prob_a": np.array([0.7, 0.5, 0.5]), "reward_a": np.array([1.0, 2.0, 1e-9]),
                       "reward_b": np.array([0.0, 2.0, 0.0])}, "rm")
    assert rm.tolist() == [1.0, 0.0, 1.0]  # a tie is wrong; a tiny positive margin is right


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ev")
    rows = toy.make_pairs(4, 60, stream=7)
    names = ["alpacaeval-easy", "mt-bench-hard", "donotanswer", "math-prm", "hep-go", "shp"]
    rb = [{**r, "subset": names[i % len(names)], "id": f"q{i}"} for i, r in enumerate(rows)]
    return write_jsonl(folder / "rb.jsonl", rb), write_jsonl(folder / "plain.jsonl", rows)


@pytest.mark.parametrize("kind", ["pm", "rm"])
def test_evaluate_end_to_end_and_predictions_recompute_the_metrics(tmp_path, eval_files, pm_folder, rm_folder, kind):
    rb, plain = eval_files
    out, preds = str(tmp_path / "m.json"), str(tmp_path / "p.jsonl")
    metrics = evaluate.main(make(EvalSettings, model=pm_folder if kind == "pm" else rm_folder, eval_file=rb,
                                 out_file=out, predictions_file=preds, batch_size=7))
    assert json.load(open(out)) == json.loads(json.dumps(metrics)) and metrics["model_type"] == kind
    rows = [json.loads(line) for line in open(preds)]
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(60)]
    assert metrics["accuracy"] == pytest.approx(np.mean([r["correct"] for r in rows]))
    for name, sub in metrics["subsets"].items():
        mine = [r["correct"] for r in rows if r["subset"] == name]
        assert (sub["n"], sub["accuracy"]) == (len(mine), pytest.approx(np.mean(mine)))
    assert set(metrics["sections"]) == {"chat", "chat_hard", "safety", "reasoning"}
    reasoning = (metrics["subsets"]["math-prm"]["accuracy"] * 984 + metrics["subsets"]["hep-go"]["accuracy"] * 164) / 1148
    assert metrics["sections"]["reasoning"] == pytest.approx(reasoning)
    assert metrics["leaderboard_score"] == pytest.approx(
        (2 * sum(metrics["sections"].values()) + metrics["subsets"]["shp"]["accuracy"]) / 9)
    assert metrics["calibration"]["brier"] == pytest.approx(np.mean([(1 - r["prob_chosen"]) ** 2 for r in rows]))
    flat = evaluate.main(make(EvalSettings, model=pm_folder if kind == "pm" else rm_folder, eval_file=plain))
    assert flat["sections"] == {} and list(flat["subsets"]) == ["all"] and flat["n"] == 60


def test_two_rank_evaluation_equals_one_rank(tmp_path, eval_files, rm_folder):
    rb, _ = eval_files
    args = [f"--model={rm_folder}", f"--eval_file={rb}", "--batch_size=4"]
    run_one_and_two_ranks("evaluate.py", args, "out_file", tmp_path / "one.json", tmp_path / "two.json", 29535)
    one, two = (json.load(open(tmp_path / f)) for f in ("one.json", "two.json"))
    assert two["n"] == one["n"] == 60
    assert two["subsets"] == one["subsets"] and two["accuracy"] == one["accuracy"]
    assert two["calibration"]["brier"] == pytest.approx(one["calibration"]["brier"], abs=1e-6)


def test_bad_eval_row_names_file_line_field_and_writes_nothing(tmp_path, pm_folder):
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps({"prompt": "t1", "chosen": "w1", "rejected": "w2"}) + "\n" +
                    json.dumps({"prompt": "t1", "chosen": "w1", "rejected": ""}) + "\n")
    from selfrm.formats import DataError
    with pytest.raises(DataError, match=r"e\.jsonl:2: field 'rejected' is empty"):
        evaluate.main(make(EvalSettings, model=pm_folder, eval_file=str(path), out_file=str(tmp_path / "m.json")))
    assert not (tmp_path / "m.json").exists()
