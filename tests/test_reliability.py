"""Every kill resumes to the same result; every bad input is one clear error and leaves
nothing behind (issue: reliability). Numbers in the comments are the issue's cases."""
import contextlib
import gzip
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import evaluate
import label
import train
from conftest import ROOT, kill_at_step, write_jsonl
from selfrm import files, trainer
from selfrm.settings import EvalSettings, LabelSettings, SettingsError, TrainSettings, cli, make, parse_args
from test_selftrain import loop

FAST = dict(lr=2e-3, warmup_steps=2, global_batch_size=16, micro_batch_size=8, log_every=1)


def run(tmp_path, name, **overrides):
    cfg = make(TrainSettings, out_dir=str(tmp_path / name), **{**FAST, **overrides})
    return cfg, train.main(cfg)


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(folder):
    """Every file under folder: its bytes and its modification time."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = (f.read(), os.stat(path).st_mtime_ns)
    return out


def temporaries(folder):
    return [os.path.join(root, n) for root, dirs, names in os.walk(folder) for n in dirs + names
            if n.startswith(".") and n.endswith(".tmp")]


# ----------------------------------------------------------------------------- kills

def test_1_a_kill_between_a_rounds_two_outputs_resumes(tmp_path, pm_folder, loop_files, monkeypatch):
    common = dict(model=pm_folder, rounds=2, threshold=0.5, save_every=2)
    cfg, straight = loop(tmp_path, "straight", loop_files, **common)
    real_replace = os.replace
    renames = []

    def killed_after_the_summary(src, dst):
        real_replace(src, dst)
        renames.append(dst)
        if dst.endswith("round_2/pool.summary.json"):
            raise KeyboardInterrupt("killed between the two renames")
    monkeypatch.setattr(files.os, "replace", killed_after_the_summary)
    with pytest.raises(KeyboardInterrupt):
        loop(tmp_path, "killed", loop_files, **common)
    monkeypatch.setattr(files.os, "replace", real_replace)
    out = tmp_path / "killed"
    # the kill is what a SIGKILL there would leave: a summary without its pool file
    assert (out / "round_2" / "pool.summary.json").exists() and not (out / "round_2" / "pool.jsonl").exists()
    _, resumed = loop(tmp_path, "killed", loop_files, **common)
    drop = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
    assert drop(resumed) == drop(straight)
    assert same_weights(weights(out / "round_2" / "model"), weights(os.path.join(cfg.out_dir, "round_2", "model")))
    assert temporaries(out) == []  # 6
    before = snapshot(out)  # 4: a finished self-training run, rerun, changes no file
    _, again = loop(tmp_path, "killed", loop_files, **common)
    assert snapshot(out) == before and drop(again) == drop(straight)


def test_2_a_complete_checkpoint_is_in_place_at_every_moment(tmp_path, toy_files, pm_folder, monkeypatch):
    common = dict(model=pm_folder, train_file=toy_files[0], max_steps=6, save_every=2)
    cfg, _ = run(tmp_path, "straight", **common)
    real_save = torch.save

    def killed_while_writing_step_4(obj, path, *args, **kwargs):
        if obj.get("step") == 4:
            with open(path, "wb") as f:
                f.write(b"half a checkpoint")
            raise KeyboardInterrupt("killed mid-write")
        return real_save(obj, path, *args, **kwargs)
    monkeypatch.setattr(trainer.torch, "save", killed_while_writing_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "killed", **common)
    monkeypatch.setattr(trainer.torch, "save", real_save)
    state = torch.load(tmp_path / "killed" / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == 2  # the last complete checkpoint, in place
    run(tmp_path, "killed", **common)
    assert same_weights(weights(tmp_path / "killed" / "model"), weights(os.path.join(cfg.out_dir, "model")))
    assert temporaries(tmp_path / "killed") == []


def test_2_leftovers_of_a_sigkilled_write_are_removed_at_the_next_start(tmp_path, toy_files, pm_folder):
    out = tmp_path / "o"
    out.mkdir()
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / ".state.pt.abc123.tmp").write_bytes(b"x" * 100)
    (out / ".model.xyz.tmp").mkdir()
    (out / ".model.xyz.tmp" / "model.safetensors").write_bytes(b"partial")
    run(tmp_path, "o", model=pm_folder, train_file=toy_files[0], max_steps=1)
    assert temporaries(out) == []


def test_3_changed_input_is_refused_and_says_how_to_start_over(tmp_path, toy_files, pm_folder):
    data = tmp_path / "train.jsonl"
    data.write_text(open(toy_files[0]).read())
    cfg, _ = run(tmp_path, "r", model=pm_folder, train_file=str(data), max_steps=2)
    with open(data, "a") as f:
        f.write(json.dumps({"prompt": "t1", "chosen": "w1", "rejected": "w2"}) + "\n")
    before = snapshot(cfg.out_dir)
    with pytest.raises(SettingsError, match=r"holds a run of other data: --train_file=.*train\.jsonl changed since the "
                                            r"run began \(size \d+ -> \d+ bytes.*pass --resume=false --overwrite=true"):
        run(tmp_path, "r", model=pm_folder, train_file=str(data), max_steps=2)
    assert snapshot(cfg.out_dir) == before  # nothing touched
    with pytest.raises(SettingsError, match=r"is not empty \(.*\): --resume=false starts over only with --overwrite=true"):
        run(tmp_path, "r", model=pm_folder, train_file=str(data), max_steps=2, resume=False)
    _, record = run(tmp_path, "r", model=pm_folder, train_file=str(data), max_steps=2, resume=False, overwrite=True)
    assert record["train_size"] == 401


def test_4_rerunning_a_finished_run_changes_no_file(tmp_path, toy_files, pm_folder, capsys):
    cfg, first = run(tmp_path, "r", model=pm_folder, train_file=toy_files[0], eval_file=toy_files[1], max_steps=2)
    before = snapshot(cfg.out_dir)
    time.sleep(0.01)
    _, again = run(tmp_path, "r", model=pm_folder, train_file=toy_files[0], eval_file=toy_files[1], max_steps=2)
    assert snapshot(cfg.out_dir) == before and again == first
    assert "holds this run, finished" in capsys.readouterr().out


def test_5_a_second_process_on_the_same_out_dir_fails_naming_the_holder(tmp_path, toy_files, pm_folder):
    out = tmp_path / "o"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                               "from selfrm.files import lock; lock(sys.argv[2]); print('held', flush=True); time.sleep(60)",
                               ROOT, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SettingsError, match=rf"is in use by another selfrm process \(pid {holder.pid}\)"):
            run(tmp_path, "o", model=pm_folder, train_file=toy_files[0], max_steps=1)
    finally:
        holder.kill()
        holder.wait()
    assert os.listdir(out) == [".lock"] and os.path.getsize(out / ".lock") == 0  # nothing written, the lock file empty
    run(tmp_path, "o", model=pm_folder, train_file=toy_files[0], max_steps=1)  # the lock died with its process


def test_a_real_sigkill_resumes_to_the_same_weights(tmp_path, toy_files, pm_folder):
    args = [sys.executable, "train.py", f"--model={pm_folder}", f"--train_file={toy_files[0]}", "--max_steps=40",
            "--save_every=3", "--global_batch_size=16", "--micro_batch_size=4", "--lr=2e-3", "--log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(args + [f"--out_dir={tmp_path / 'straight'}"], cwd=ROOT, env=env, check=True, capture_output=True)
    out = tmp_path / "killed"
    child = subprocess.Popen(args + [f"--out_dir={out}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoint" / "state.pt").exists() and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (out / "model").exists(), "the run finished before the kill: make it longer"
    done = subprocess.run(args + [f"--out_dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout + done.stderr
    assert same_weights(weights(out / "model"), weights(tmp_path / "straight" / "model"))
    assert temporaries(out) == []


# ----------------------------------------------------------------------------- bad input: one line, exit 2, nothing written

GOOD = {"prompt": "t1", "chosen": "w1 w2", "rejected": "w3"}


def bad_files(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD] * 20)
    paths = {"good": good, "nan_margin": tmp_path / "nan.jsonl", "latin1": tmp_path / "latin1.jsonl",
             "corrupt_gz": tmp_path / "corrupt.jsonl.gz", "deep": tmp_path / "deep.jsonl", "folder": tmp_path}
    paths["nan_margin"].write_text(json.dumps(GOOD) + "\n" + '{"prompt": "t", "chosen": "w1", "rejected": "w2", "margin": NaN}\n')
    paths["latin1"].write_bytes((json.dumps(GOOD) + "\n").encode() + '{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with gzip.open(paths["corrupt_gz"], "wb") as f:
        f.write((json.dumps(GOOD) + "\n").encode() * 50)
    paths["corrupt_gz"].write_bytes(paths["corrupt_gz"].read_bytes()[:40])  # cut short
    paths["deep"].write_text('{"prompt": ' + "[" * 50000 + "]" * 50000 + "}\n")
    return {k: str(v) for k, v in paths.items()}


TRAIN_CASES = [  # (extra flags, the words of the error)
    (["--train_file={nan_margin}"], r"nan\.jsonl:2: field 'margin' must be a finite number, got nan"),
    (["--train_file={good}", "--micro_batch_size=-2"], r"--micro_batch_size=-2: must be at least 1"),
    (["--train_file={good}", "--max_length=4"], r"--max_length=4: the template with one token of context and of each "
                                                r"response takes \d+ tokens for this model: use --max_length=\d+ or more"),
    (["--train_file={good}", "--threshold=1.5"], r"--threshold=1\.5: must be a probability, in \[0, 1\]"),
    (["--train_file={good}", "--labeled_fraction=1"], r"--labeled_fraction=1\.0: must be a fraction in \[0, 1\)"),
    (["--train_file={good}", "--rounds=-1"], r"--rounds=-1: must be 0 or more"),
    (["--train_file={latin1}"], r"latin1\.jsonl:2: not UTF-8 text \(byte 0xe9"),
    (["--train_file={corrupt_gz}"], r"corrupt\.jsonl\.gz: not a readable gzip file"),
    (["--train_file={deep}"], r"deep\.jsonl:1: JSON nested too deeply to read"),
    (["--train_file={folder}"], r": is a folder, not a data file"),
    (["--train_file={good}", "--global_batch_size=0"], r"--global_batch_size=0: must be at least 1"),
    (["--train_file={good}", "--batch_size=0"], r"--batch_size=0: must be at least 1"),
    (["--train_file={good}", "--epochs=0"], r"--epochs=0: must be at least 1"),
    (["--train_file={good}", "--lr=-1e-5"], r"--lr=-1e-05: must be a finite number >= 0"),
    (["--train_file={good}", "--lr=nan"], r"--lr=nan: must be a finite number >= 0"),
    (["--train_file={good}", "--log_every=0"], r"--log_every=0: must be at least 1"),
    (["--train_file={good}", "--max_length=0"], r"--max_length=0: must be at least 1"),
    (["--train_file={good}", "--model=./no/such/model"], r"--model=\./no/such/model: no such model folder"),
    (["--train_file={good}", "--out_dir={good}"], r"--out_dir=.*good\.jsonl: is a file, not a folder"),
    (["--train_file={good}", "--out_dir="], r"--out_dir is empty"),
    (["--train_file={good}", "--margin=inf"], r"--margin=inf: must be a finite number"),
]


def one_line_error(capsys, main, parse):
    with pytest.raises(SystemExit) as e:
        cli(main, parse)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("flags, message", TRAIN_CASES, ids=[m[:30] for _, m in TRAIN_CASES])
def test_7_8_9_bad_training_input(tmp_path, capsys, pm_folder, flags, message):
    paths = bad_files(tmp_path)
    before = {p: open(p, "rb").read() for p in paths.values() if os.path.isfile(p)}
    out = tmp_path / "out"
    argv = [f"--model={pm_folder}", f"--out_dir={out}"] + [f.format(**paths) for f in flags]
    import re
    err = one_line_error(capsys, train.main, lambda: train.settings_from_argv(argv))
    assert re.search(message, err), err
    assert not out.exists()  # 9: nothing written, not even settings.json
    assert not os.path.exists("settings.json")
    assert all(open(p, "rb").read() == b for p, b in before.items())  # inputs unchanged
    if "--micro_batch_size=-2" in flags:  # 9: the corrected command then runs (no 'other settings' refusal)
        train.main(train.settings_from_argv([f"--model={pm_folder}", f"--out_dir={out}", f"--train_file={paths['good']}",
                                             "--max_steps=1", "--global_batch_size=8", "--micro_batch_size=4"]))


def test_7_a_margin_in_a_pairwise_file_is_a_warning(tmp_path, capsys, pm_folder):
    path = write_jsonl(tmp_path / "m.jsonl", [{**GOOD, "margin": 0.5}] * 16)
    run(tmp_path, "o", model=pm_folder, train_file=path, max_steps=1)
    out = capsys.readouterr().out
    assert out.count("warning:") == 1 and "16 pairs carry a 'margin': a pairwise model (pm) has no margin" in out


@pytest.fixture(scope="module")
def pool_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pool") / "pool.jsonl",
                       [{"prompt": "t1", "response_a": "w1", "response_b": "w2", "label": "a"}] * 6)


def test_7_10_label_and_evaluate_refuse_contradictions_and_clobbering(tmp_path, capsys, pm_folder, rm_folder, pool_file):
    from selfrm.files import write_json
    trained = tmp_path / "trained"
    import shutil
    shutil.copytree(rm_folder, trained)
    write_json(str(trained / "settings.json"), {"model_type": "rm"})
    cases = [
        (label.main, lambda: parse_args(LabelSettings, [f"--model={trained}", "--model_type=pm", f"--unlabeled_file={pool_file}",
                                                        f"--out_file={tmp_path / 'x.jsonl'}"]), "contradicts"),
        (evaluate.main, lambda: parse_args(EvalSettings, [f"--model={trained}", "--model_type=pm", f"--eval_file={pool_file}"]),
         "--model_type=pm contradicts .* which was trained as --model_type=rm"),
        (label.main, lambda: parse_args(LabelSettings, [f"--model={pm_folder}", f"--unlabeled_file={pool_file}",
                                                        f"--out_file={tmp_path}"]), r"--out_file=.*: is a folder; name a file"),
        (label.main, lambda: parse_args(LabelSettings, [f"--model={pm_folder}", f"--unlabeled_file={pool_file}",
                                                        f"--out_file={pool_file}"]), "is an input file of this run"),
        (evaluate.main, lambda: parse_args(EvalSettings, [f"--model={pm_folder}", f"--eval_file={pool_file}",
                                                          f"--predictions_file={pool_file}"]), "is an input file of this run"),
    ]
    import re
    before = open(pool_file, "rb").read()
    for main, parse, message in cases:
        assert re.search(message, one_line_error(capsys, main, parse))
    assert open(pool_file, "rb").read() == before and not (tmp_path / "x.jsonl").exists()


def test_10_label_outputs_appear_together_or_not_at_all(tmp_path, pm_folder, pool_file, monkeypatch):
    out = tmp_path / "labeled.jsonl"
    real_replace = os.replace
    calls = []

    def second_rename_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        real_replace(src, dst)
    monkeypatch.setattr(files.os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="disk full"):
        label.main(make(LabelSettings, model=pm_folder, unlabeled_file=pool_file, out_file=str(out)))
    assert sorted(os.listdir(tmp_path)) == []  # neither the rows nor the summary, and no temporary
    monkeypatch.setattr(files.os, "replace", real_replace)
    label.main(make(LabelSettings, model=pm_folder, unlabeled_file=pool_file, out_file=str(out)))
    assert sorted(os.listdir(tmp_path)) == ["labeled.jsonl", "labeled.summary.json"]


# ----------------------------------------------------------------------------- modes

@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_11_files_and_folders_follow_the_umask(tmp_path, toy_files, rm_folder, mask):
    old = os.umask(mask)
    try:
        cfg, _ = run(tmp_path, "o", model=rm_folder, model_type="rm", train_file=toy_files[0], max_steps=2,
                     save_every=1)
    finally:
        os.umask(old)
    seen = 0
    for root, dirs, names in os.walk(cfg.out_dir):
        for d in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode) == 0o777 & ~mask, d
        for n in names:
            assert stat.S_IMODE(os.stat(os.path.join(root, n)).st_mode) == 0o666 & ~mask, n
            seen += n == "model.safetensors"
    assert seen == 1


# ----------------------------------------------------------------------------- distributed

STALL_RANK_1 = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from selfrm import trainer
import train

real = trainer.lr_at

def stalling(step, total, cfg):  # rank 1 stops answering after its first backward; rank 0 waits on it
    if os.environ["RANK"] == "1":
        time.sleep(3600)
    return real(step, total, cfg)

trainer.lr_at = stalling
from selfrm.settings import cli
cli(train.main, lambda: train.settings_from_argv(sys.argv[2:]))
"""


def test_12_a_stalled_rank_ends_the_run_with_a_timeout_error(tmp_path, toy_files, pm_folder):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    wrapper = tmp_path / "stalling.py"
    wrapper.write_text(STALL_RANK_1)
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
                           str(wrapper), ROOT, f"--model={pm_folder}", f"--train_file={toy_files[0]}", "--max_steps=2",
                           "--global_batch_size=16", "--micro_batch_size=8", "--dist_timeout_s=5",
                           f"--out_dir={tmp_path / 'o'}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "error: a collective timed out: a rank stopped answering for --dist_timeout_s" in done.stderr, done.stderr[-3000:]
    assert time.time() - start < 120


def test_12_on_nccl_a_timed_out_collective_is_one_the_cli_reports():
    """With TORCH_NCCL_BLOCKING_WAIT=1 (README: selfrm does not set it) the rank waiting on a
    collective that timed out raises; both of torch's wordings of it give the cli's one line."""
    from selfrm import dist
    for message in ("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE, "
                    "Timeout(ms)=5000) ran for 5004 milliseconds before timing out.",
                    "[Rank 0] Work WorkNCCL(SeqNum=9, OpType=ALLREDUCE) timed out in blocking wait."):
        assert dist.timed_out(torch.distributed.DistBackendError(message))
    assert not dist.timed_out(torch.distributed.DistBackendError("NCCL error: unhandled system error"))


def test_12_ranks_meet_before_teardown_only_on_a_clean_exit(monkeypatch):
    """A barrier before destroy_process_group avoids gloo's destructor deadlock; after an
    exception a rank must not wait there for ranks that may be stuck elsewhere."""
    import torch.distributed as tdist

    from selfrm import dist
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29547")
    barriers = []
    monkeypatch.setattr(tdist, "barrier", lambda *a, **k: barriers.append(1))
    for fail in (False, True):
        tdist.init_process_group("gloo", rank=0, world_size=1)
        with pytest.raises(ValueError) if fail else contextlib.nullcontext():
            try:
                if fail:
                    raise ValueError("a failing rank")
            finally:
                dist.compute_cleanup()
        assert not tdist.is_initialized()
    assert barriers == [1]


def test_12_resuming_with_another_number_of_ranks_is_a_clear_error(tmp_path, toy_files, pm_folder, monkeypatch):
    common = dict(model=pm_folder, train_file=toy_files[0], max_steps=6, save_every=2)
    revive = kill_at_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "o", **common)
    revive()
    path = tmp_path / "o" / "checkpoint" / "state.pt"
    state = torch.load(path, weights_only=True)
    for key in ("rng", "cuda_rng", "window_sums"):  # as two ranks would have saved it
        state[key] = state[key] * 2
    torch.save(state, path)
    with pytest.raises(SettingsError, match=r"checkpointed by 2 ranks and is resumed by 1: resume it with "
                                            r"--nproc_per_node=2"):
        run(tmp_path, "o", **common)
