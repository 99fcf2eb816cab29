"""Tests of ablate.py: the table's numbers, the verdicts, resuming, errors, the rl and distill studies' commands and
scores (with stand-ins for train.py, rl.py, distill.py and eval.py that write known scores), and the smoke study end
to end through the real train.py."""
import json
import os
import sys

import pytest

import ablate

# Stand-ins, one script under each name; each records its name and flags. train.py writes test scores that depend on
# --lr and --seed (detail: 0.5, 0.6, 0.7 at lr 1e-3; 0.2, 0.25, 0.3 at 3e-4; caption 0.4; any other task 0.9), or
# fails for the seed in FAIL_SEED. rl.py: held-out score (its --tasks) 0.5 before; after, 0.8 + 0.1 seed with sapo, 0.5 + 0.1 seed
# otherwise; reward 0.1 step + 0.1 seed. distill.py: held-out KL 2 at --steps 0 from a preset, else 1 + 0.1 seed
# (phase off) or 0.5 + 0.1 seed (phase on). eval.py: text 0.3 + 0.1 seed for a student whose path names sft, 0.6
# + 0.1 seed otherwise (the seed read from the path); lookup 1.
FAKE = """
import json, os, sys
argv = sys.argv[1:]
flag = lambda name: argv[argv.index(name) + 1] if name in argv else None
script = os.path.basename(sys.argv[0])
with open(os.environ["CALLS"], "a") as f:
    f.write(json.dumps([script] + argv + ["threads=" + os.environ["OMP_NUM_THREADS"]]) + "\\n")
out = flag("--out_dir")
seed = int(flag("--seed") if script != "eval.py" else flag("--init_from").split("/seed")[1][0])
if str(seed) == os.environ.get("FAIL_SEED"):
    sys.exit(3)
def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").write(text)
if out:
    write(os.path.join(out, "hf", "config.json"), "{}")
if script == "train.py" and flag("--eval_tasks"):
    detail = 0.5 + 0.1 * seed if flag("--lr") == "1e-3" else 0.2 + 0.05 * seed
    scores = {"detail": detail, "caption": 0.4}
    write(os.path.join(out, "test_scores.json"), json.dumps(
        {t: {"score": scores.get(t, 0.9), "n": 2, "chance": {"detail": 1 / 3, "caption": 0.17}.get(t, 0.2)}
         for t in flag("--eval_tasks").split(",")}))
elif script == "rl.py":
    after = (0.8 if flag("--algo") == "sapo" else 0.5) + 0.1 * seed
    steps = int(flag("--steps"))
    task = flag("--tasks")
    metrics = [{"step": 0, "eval": {task: 0.5}}] + [{"step": s, "reward": 0.1 * s + 0.1 * seed}
                                                       for s in range(1, steps + 1)]
    write(os.path.join(out, "metrics.jsonl"), "".join(json.dumps(m) + "\\n" for m in metrics
                                                      + [{"step": steps, "eval": {task: after}}]))
elif script == "distill.py":
    kl = 2.0 if flag("--steps") == "0" else (1.0 if flag("--phase") == "off" else 0.5) + 0.1 * seed
    write(os.path.join(out, "metrics.jsonl"), json.dumps({"step": 0, "eval_kl": 9.0}) + "\\n"
          + json.dumps({"step": int(flag("--steps")), "eval_kl": kl}) + "\\n")
elif script == "eval.py":
    text = (0.3 if "sft" in flag("--init_from") else 0.6) + 0.1 * seed
    write(flag("--out"), json.dumps({"lookup": {"score": 1.0, "chance": 0.2}, "text": {"score": text, "chance": 0.24}}))
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A folder of stand-ins for the scripts ablate.py runs."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for name in ("train.py", "rl.py", "distill.py", "eval.py"):
        (scripts / name).write_text(FAKE)
    monkeypatch.setenv("CALLS", str(tmp_path / "calls.jsonl"))
    return str(scripts)


def calls(tmp_path):
    path = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_mean_sd_by_hand():
    mean, sd, n = ablate.mean_sd([0.5, 0.7, 0.9])
    assert (mean, n) == (pytest.approx(0.7), 3) and sd == pytest.approx(0.2)  # sqrt((0.04 + 0 + 0.04) / 2)
    mean, sd, n = ablate.mean_sd([0.2, 0.25, 0.3, 0.45])
    assert mean == pytest.approx(0.3) and sd == pytest.approx((0.035 / 3) ** 0.5) and n == 4
    assert ablate.mean_sd([0.3]) == (0.3, None, 1)


def test_table_and_verdict_from_the_runs(tmp_path, fake):
    out, log = tmp_path / "smoke", tmp_path / "LOG.md"
    log.write_text("# Development log\n\nIntro.\n\n## 2026-01-01: an older entry\n\nText.\n")
    argv = ["smoke", "--seeds", "3", "--jobs", "2", "--out_dir", str(out), "--log", str(log)]
    r = ablate.main(argv, scripts=fake)
    high, low = r["variants"]["lr-high"]["detail"], r["variants"]["lr-low"]["detail"]
    assert (high["mean"], high["sd"], high["n"]) == (pytest.approx(0.6), pytest.approx(0.1), 3)
    assert (low["mean"], low["sd"], low["n"]) == (pytest.approx(0.25), pytest.approx(0.05), 3)
    assert sorted(high["scores"]) == pytest.approx([0.5, 0.6, 0.7])
    assert r["variants"]["lr-low"]["caption"]["sd"] == pytest.approx(0, abs=1e-12)
    assert r["chance"]["detail"] == pytest.approx(1 / 3)
    # difference 0.35, standard error sqrt(0.01 / 3 + 0.0025 / 3) = 0.065; over one pooled sd, sqrt(0.0125 / 2)
    assert r["verdicts"] == ["lr-high is better than lr-low on detail by 0.35 ± 0.06 (3 seeds): agrees with the paper"]
    md = (out / "results.md").read_text()
    assert "| lr-high | 0.40 ± 0.00 (3) | 0.60 ± 0.10 (3) |" in md and "| chance | 0.17 | 0.33 |" in md
    assert json.loads((out / "results.json").read_text())["verdicts"] == r["verdicts"]
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = log.read_text()  # the new entry goes above the older one (newest first), the intro stays on top
    assert text.index("Intro.") < text.index("ablation `smoke`") < text.index("an older entry")
    assert "agrees with the paper" in text and "| lr-low | 0.40 ± 0.00 (3) | 0.25 ± 0.05 (3) |" in text
    # every run got the shared flags, its variant's, its seed and its own folder, with cores // jobs threads
    runs = calls(tmp_path)
    assert len(runs) == 6 and {a[0] for a in runs} == {"train.py"}
    assert {(a[a.index("--lr") + 1], a[a.index("--seed") + 1], a[a.index("--out_dir") + 1]) for a in runs} == {
        (lr, str(s), str(out / v / f"seed{s}")) for v, lr in (("lr-high", "1e-3"), ("lr-low", "3e-4"))
        for s in range(3)}
    assert all("--stages" in a and a[a.index("--eval_tasks") + 1] == "caption,detail" and "--resume" not in a
               and a[-1] == f"threads={max(1, os.cpu_count() // 2)}" for a in runs)


def test_verdicts_say_within_noise_and_disagree():
    study = ablate.STUDIES["smoke"]

    def table(high, low):
        return {v: {"detail": dict(zip(("mean", "sd", "n"), ablate.mean_sd(xs)))} for v, xs in
                (("lr-high", high), ("lr-low", low))}
    # difference 0.05, pooled sd 0.1: within noise
    [line] = ablate.verdicts(study, table([0.4, 0.5, 0.6], [0.35, 0.45, 0.55]))
    assert line.endswith("within noise") and "+0.05" in line
    [line] = ablate.verdicts(study, table([0.1, 0.2], [0.6, 0.7]))
    assert line == "lr-high is worse than lr-low on detail by 0.50 ± 0.07 (2 seeds): disagrees with the paper"
    [line] = ablate.verdicts(study, table([0.1], [0.6, 0.7]))
    assert "no verdict" in line


def test_finished_runs_are_skipped_and_checkpointed_ones_resumed(tmp_path, fake, monkeypatch):
    out = tmp_path / "smoke"
    monkeypatch.setenv("FAIL_SEED", "1")
    with pytest.raises(SystemExit, match="2 runs failed"):
        ablate.main(["smoke", "--seeds", "2", "--out_dir", str(out), "--log", ""], scripts=fake)
    assert len(calls(tmp_path)) == 4 and (out / "results.md").exists()  # the table of the seed-0 runs
    assert json.loads((out / "results.json").read_text())["variants"]["lr-high"]["detail"]["n"] == 1
    (out / "lr-high" / "seed1" / "latest").write_text("ckpt-0000002")  # as if it stopped after a checkpoint
    monkeypatch.delenv("FAIL_SEED")
    ablate.main(["smoke", "--seeds", "2", "--out_dir", str(out), "--log", ""], scripts=fake)
    again = calls(tmp_path)[4:]
    assert sorted((a[a.index("--out_dir") + 1], "--resume" in a) for a in again) == [
        (str(out / "lr-high" / "seed1"), True), (str(out / "lr-low" / "seed1"), False)]
    ablate.main(["smoke", "--seeds", "2", "--out_dir", str(out), "--log", ""], scripts=fake)
    assert len(calls(tmp_path)) == 6  # all finished: nothing runs


def test_bad_arguments_are_named(tmp_path, fake, capsys):
    for argv, message in ((["deepstak"], "study='deepstak': known studies are deepstack, mrope, timestamps"),
                          (["smoke", "--seeds", "0"], "--seeds 0: must be >= 1"),
                          (["smoke", "--jobs", "0"], "--jobs 0: must be >= 1")):
        with pytest.raises(SystemExit):
            ablate.main(argv + ["--out_dir", str(tmp_path / "x")], scripts=fake)
        assert message in capsys.readouterr().err
    assert calls(tmp_path) == []


def test_steps_are_shared_out_by_the_stages():
    study = ablate.STUDIES["deepstack"]
    assert ablate.stage_flag(study, 300) == "align:45,study-deepstack:255"
    assert ablate.stage_flag(study, 1) == "align:1,study-deepstack:1"  # every stage gets a step


def test_smoke_study_end_to_end(tmp_path):
    """The real train.py: two variants, one seed, a few steps; the results, the plot and the log entry appear."""
    out, log = tmp_path / "smoke", tmp_path / "LOG.md"
    r = ablate.main(["smoke", "--seeds", "1", "--jobs", "2", "--out_dir", str(out), "--log", str(log)])
    for v in ("lr-low", "lr-high"):
        scores = json.loads((out / v / "seed0" / "test_scores.json").read_text())
        assert set(scores) == {"caption", "detail"} and scores["detail"]["n"] == 2
        assert r["variants"][v]["detail"]["n"] == 1 and 0 <= r["variants"][v]["detail"]["mean"] <= 1
        assert "test (2 per task)" in (out / v / "seed0" / "run.log").read_text()
    assert (out / "results.png").stat().st_size > 1000
    assert "| chance | 0.17 | 0.33 |" in (out / "results.md").read_text()
    assert "no verdict" in r["verdicts"][0] and "ablation `smoke`" in log.read_text()
    assert json.loads((out / "results.json").read_text())["variants"] == r["variants"]


def test_study_samples_fit_the_recipe_rows():
    """The studies train with the toy recipe's rows (192 tokens on the CPU): every training task of their mixes has
    samples that fit one, with the tokenizer train.py trains (the study tasks' words are not in its corpus)."""
    from data.toy import MIXES, SETTINGS, ToyData
    from processor import Processor
    from tokenizer import Tokenizer
    data = ToyData(seed=0)
    tok = Tokenizer.train((f"user\n{t}\nassistant\n" for t in data.text_corpus(4000)), SETTINGS["vocab_size"])
    processor = Processor(tok, **data.budgets)
    tasks = {t for name in ("study-deepstack", "study-video") for t in MIXES[name]}
    assert {"detail", "vground", "needle"} <= tasks
    for task in sorted(tasks):
        for i in range(4):
            n = processor([data.world.sample("train", i, task=task)["messages"]])["input_ids"].shape[1]
            assert n <= SETTINGS["seq_len"], (task, i, n)
    long = processor([data.world.sample("test", 0, task="needle-long")["messages"]])["input_ids"].shape[1]
    assert long > 3 * SETTINGS["seq_len"]  # evaluated only: a test sample is not packed into a row


def test_rl_study_scores_before_and_after_and_plots_the_rewards(tmp_path, fake):
    """rl.py from --base per algorithm and seed; the table holds its first and last held-out scores, the reward
    curves their mean ± sd over the seeds."""
    out, log, base = tmp_path / "rl", tmp_path / "LOG.md", tmp_path / "base"
    base.mkdir()
    r = ablate.main(["rl", "--base", str(base), "--seeds", "2", "--steps", "3", "--jobs", "2", "--out_dir", str(out),
                     "--log", str(log)], scripts=fake)
    sapo, grpo = r["variants"]["sapo"], r["variants"]["grpo"]
    assert sapo["count (base)"]["mean"] == pytest.approx(0.5) and sapo["count (base)"]["sd"] == pytest.approx(0)
    assert sapo["count"]["scores"] == pytest.approx([0.8, 0.9]) and grpo["count"]["mean"] == pytest.approx(0.55)
    assert r["chance"] == {"count (base)": 0.25, "count": 0.25}  # the toy world's count task
    assert r["verdicts"][0].startswith("sapo is better than grpo on count by 0.30 ± 0.07 (2 seeds)")  # sd 0.07 each
    # rewards per step over the two seeds: 0.1 s and 0.1 s + 0.1
    assert r["rewards"]["gspo"] == {s: pytest.approx([0.1 * s, 0.1 * s + 0.1]) for s in (1, 2, 3)}
    assert (out / "rewards.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| sapo | 0.50 ± 0.00 (2) | 0.85 ± 0.07 (2) |" in (out / "results.md").read_text()
    runs = calls(tmp_path)
    assert len(runs) == 6 and {a[0] for a in runs} == {"rl.py"}
    assert all(a[a.index("--init_from") + 1] == str(base) and a[a.index("--steps") + 1] == "3" for a in runs)
    assert {(a[a.index("--algo") + 1], a[a.index("--seed") + 1]) for a in runs} == {
        (algo, str(s)) for algo in ("sapo", "grpo", "gspo") for s in (0, 1)}
    assert "ablation `rl`" in log.read_text() and f"from {base}" in log.read_text()
    ablate.main(["rl", "--base", str(base), "--tasks", "text", "--seeds", "1", "--steps", "2", "--out_dir",
                 str(tmp_path / "text"), "--log", ""], scripts=fake)
    assert {a[a.index("--tasks") + 1] for a in calls(tmp_path)} == {"count", "text"}


def test_distill_study_builds_teacher_and_student_then_runs_each_phase_from_the_last(tmp_path, fake):
    out = tmp_path / "distill"
    argv = ["distill", "--seeds", "2", "--steps", "6", "--jobs", "1", "--out_dir", str(out), "--log", ""]
    r = ablate.main(argv, scripts=fake)
    runs = calls(tmp_path)
    teacher, student = runs[0], runs[1]
    assert teacher[0] == "train.py" and teacher[teacher.index("--out_dir") + 1] == str(out / "teacher")
    assert student[0] == "distill.py" and student[student.index("--student_arch") + 1] == "text.num_hidden_layers=2"
    init = str(out / "student0" / "hf")
    seed0 = [a for a in runs[2:] if any("/seed0/" in x for x in a)]
    flag = lambda a, name: a[a.index(name) + 1]  # noqa: E731
    sft, kl, test_sft, off, test_off, off2, on, test_on = seed0
    assert (sft[0], flag(sft, "--init_from"), flag(sft, "--stages")) == ("train.py", init, "text:6")
    assert (kl[0], flag(kl, "--student"), flag(kl, "--steps")) == ("distill.py", flag(sft, "--out_dir") + "/hf", "0")
    assert (off[0], flag(off, "--student"), flag(off, "--steps"), flag(off, "--phase")) == ("distill.py", init, "6",
                                                                                           "off")
    assert (flag(off2, "--steps"), flag(on, "--steps"), flag(on, "--phase")) == ("4", "2", "on")
    assert flag(on, "--student") == flag(off2, "--out_dir") + "/hf" and flag(test_on, "--init_from") == \
        flag(on, "--out_dir") + "/hf"
    assert all(t[0] == "eval.py" and flag(t, "--tasks") == "lookup,text" for t in (test_sft, test_off, test_on))
    assert all(flag(a, "--teacher") == str(out / "teacher") for a in (kl, off, off2, on))
    v = r["variants"]
    assert v["sft"]["held-out KL"]["scores"] == pytest.approx([2.0, 2.0])  # distill.py --steps 0 on the SFT model
    assert v["off"]["held-out KL"]["mean"] == pytest.approx(1.05) and v["off-on"]["held-out KL"]["mean"] == \
        pytest.approx(0.55)
    assert v["sft"]["text"]["scores"] == pytest.approx([0.3, 0.4]) and v["off-on"]["text"]["mean"] == \
        pytest.approx(0.65)
    assert r["chance"]["text"] == 0.24 and r["chance"]["held-out KL"] is None
    assert "| off-on | 1.00 ± 0.00 (2) | 0.65 ± 0.07 (2) | 0.55 ± 0.07 (2) |" in (out / "results.md").read_text()
    assert len(runs) == 2 + 2 * (3 + 2 + 3)
    ablate.main(argv, scripts=fake)
    assert len(calls(tmp_path)) == len(runs)  # all finished: nothing runs again
    # a given teacher: nothing builds one, every command uses it
    other = tmp_path / "given"
    ablate.main(["distill", "--teacher", str(tmp_path), "--seeds", "1", "--steps", "3", "--out_dir", str(other),
                 "--log", ""], scripts=fake)
    more = calls(tmp_path)[len(runs):]
    assert not any(a[0] == "train.py" and "--init_from" not in a for a in more)
    assert all(flag(a, "--teacher") == str(tmp_path) for a in more if a[0] == "distill.py")


def test_post_training_flags_are_checked(tmp_path, fake, capsys):
    for argv, message in ((["rl"], "--base '': the rl study needs the model to start from"),
                          (["rl", "--base", str(tmp_path / "none")], "the rl study needs"),
                          (["smoke", "--base", str(tmp_path)], "--base is for the rl study, not smoke"),
                          (["rl", "--base", str(tmp_path), "--teacher", str(tmp_path)], "--teacher is for the distill"),
                          (["distill", "--teacher", str(tmp_path / "none")], "no such directory"),
                          (["distill", "--tasks", "text"], "--tasks is for the rl study"),
                          (["rl", "--base", str(tmp_path), "--tasks", "count,txt"], "'txt' is not a toy world task")):
        with pytest.raises(SystemExit):
            ablate.main(argv + ["--out_dir", str(tmp_path / "x")], scripts=fake)
        assert message in capsys.readouterr().err
    assert calls(tmp_path) == []
