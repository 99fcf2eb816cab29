"""
Design ablations at toy scale, with error bars: do the design choices of the Qwen3-VL report hold on the toy world?

    python ablate.py deepstack                      # DeepStack on vs off: 2 variants x 3 seeds on the CPU
    python ablate.py mrope --jobs 16                # interleaved vs chunked MRoPE vs text-only (1-D) positions
    python ablate.py timestamps --gpu               # textual timestamps vs T-RoPE vs none: toy-gpu, more steps
    python ablate.py deepstack --dry_run            # print the train.py commands and stop
    python ablate.py rl --base out/toy --jobs 2     # SAPO vs GRPO vs GSPO (rl.py) from a trained toy run
    python ablate.py distill --jobs 2               # SFT vs off-policy vs off- then on-policy distillation

A study is a hypothesis, the report's direction (the variant it says is better), its variants (name -> extra
train.py flags), the train.py flags every run shares (stages and their task mix, steps, test samples) and the tasks
it reports. Each run (variant x seed) is one `python train.py ... --seed S --out_dir <out_dir>/<variant>/seed<S>`,
its output in run.log there; --jobs run at once, each with cores // jobs threads (--gpu: one GPU each, round
robin). A run whose test_scores.json exists is done and skipped; one with a checkpoint is resumed (--resume), so the
same command continues a stopped study. Then: results.md and results.json (per task, mean ± sd over the seeds),
results.png (bars with sd error bars, chance marked) in --out_dir, and a dated entry in dev/LOG.md with a verdict per
key task, computed from the numbers.

Post-training studies run other scripts from a given model. `rl`: each run one `rl.py --init_from <--base>`; the
scores are its greedy held-out ones (metrics.jsonl) at the start ("<task> (base)") and at the end, and rewards.png
draws the training reward per step, mean ± sd over the seeds. `distill`: each run a short sequence of commands from
one student init, ending with `eval.py` (test accuracy) and a held-out KL to the teacher (distill.py's eval_kl;
`distill.py --steps 0` for the SFT student); the teacher (train.py on the text questions) and the student init
(distill.py --steps 0 from a 2-layer toy-cpu) are built first into --out_dir unless --teacher is given. Every
command of a run is skipped once its output exists and resumed from its checkpoint, like a train.py run.

Every design run starts from scratch. A common base run shared by the variants would be cheaper, but DeepStack off has
fewer parameters, and a base trained under one position layout or time encoding favours that one. The seed also
picks the toy world's training and test samples (train.py --seed), so the spread over seeds includes theirs.
"""
import argparse
import dataclasses
import datetime
import json
import math
import os
import queue
import shlex
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass(frozen=True)
class Study:
    """One design question: what is compared, how every run trains, and what is reported."""
    hypothesis: str
    paper: str              # what the Qwen3-VL report says, in a sentence
    better: str             # the variant the report says is better
    variants: dict          # name -> extra train.py flags
    stages: tuple           # ((stage, share of the steps), ...): data/toy.py's stages
    steps: int              # total steps on the CPU (--gpu: gpu_steps; --steps overrides both)
    gpu_steps: int
    tasks: tuple            # scored at the end (train.py --eval_tasks) and reported
    key: tuple              # the tasks the hypothesis is about: one verdict line each, per other variant
    flags: tuple = ()       # more flags for every run (of train.py; rl: of rl.py)
    runner: str = "train"   # "train", "rl" (variants: rl.py flags) or "distill" (variants: DISTILL phases)


STUDIES = {
    "deepstack": Study(
        hypothesis="Feeding the LLM's first layers the ViT's intermediate features (DeepStack) helps with detail "
                   "smaller than a patch (a 4-px hole) and with reading words.",
        paper="Qwen3-VL report: DeepStack injects multi-level ViT features into the LLM to capture fine-grained "
              "visual detail; on is better.",
        better="on", variants={"on": ["--arch", "deepstack=true"], "off": ["--arch", "deepstack=false"]},
        stages=(("align", 0.15), ("study-deepstack", 0.85)), steps=300, gpu_steps=1500,
        tasks=("detail", "ocr", "attribute", "caption"), key=("detail", "ocr")),
    "mrope": Study(
        hypothesis="Interleaving time, height and width over the rotary frequencies gives better temporal grounding "
                   "and retrieval in videos longer than the training ones than the chunked layout, and better "
                   "spatial grounding than text-only (1-D) positions.",
        paper="Qwen3-VL report: interleaved MRoPE spreads t, h, w over the full frequency spectrum (the chunked "
              "layout of Qwen2-VL does not), for long-video understanding; interleaved is better.",
        better="interleaved",
        variants={v: ["--arch", f"text.mrope_layout={v}"] for v in ("interleaved", "chunked", "text")},
        stages=(("align", 0.15), ("study-video", 0.85)), steps=150, gpu_steps=1500,
        tasks=("vground", "vground-long", "needle", "needle-long", "bbox"),
        key=("vground-long", "needle-long", "bbox")),
    "timestamps": Study(
        hypothesis="Textual timestamps before each temporal patch give better temporal grounding than time in the "
                   "position ids (T-RoPE) or no time at all, most of all in videos longer than the training ones.",
        paper="Qwen3-VL report: textual timestamps replace Qwen2.5-VL's time-aligned T-RoPE for more precise "
              "temporal grounding; timestamps is better.",
        better="timestamps",
        variants={v: ["--arch", f"video_time={v}"] for v in ("timestamps", "trope", "none")},
        stages=(("align", 0.15), ("study-video", 0.85)), steps=150, gpu_steps=1500,
        tasks=("vground", "vground-long", "video"), key=("vground", "vground-long", "video")),
    "rl": Study(
        hypothesis="From a trained toy model, RL on a verifiable task (by default count, the toy run's hardest) "
                   "raises its held-out greedy score, and SAPO's soft gate does at least as well as GRPO's token clip "
                   "and GSPO's sequence clip at the same budget.",
        paper="Qwen3-VL report §4.4: SAPO (arXiv 2511.20347) is the RL algorithm, reported more stable than GRPO "
              "and GSPO; sapo is better.",
        better="sapo", variants={a: ["--algo", a] for a in ("sapo", "grpo", "gspo")}, stages=(), steps=40,
        gpu_steps=200, tasks=("count",), key=("count",), runner="rl",
        flags=("--data", "toy", "--prompts", "16", "--group_size", "8", "--minibatches", "2",
               "--max_new_tokens", "64", "--lr", "3e-5", "--eval_samples", "64", "--save_every", "10")),
    "distill": Study(
        hypothesis="At the same number of steps on the same replies, a 2-layer student distilled from a 4-layer "
                   "teacher (forward KL to its top-64) comes closer to the teacher and answers better than one "
                   "trained by SFT, and on-policy steps after the off-policy ones help further.",
        paper="Qwen3 report §4.5 / Qwen3-VL report §4.3: strong-to-weak distillation, off-policy then on-policy, "
              "beats training the small model directly; off-on is better.",
        better="off-on", variants={"sft": (("sft", 1.0),), "off": (("off", 1.0),), "off-on": (("off", 2 / 3),
                                                                                                ("on", 1 / 3))},
        stages=(), steps=150, gpu_steps=600, tasks=("lookup", "text"), key=("lookup", "text"), runner="distill"),
    # the runner's own check (tests/test_ablate.py): two learning rates, a few steps
    "smoke": Study(
        hypothesis="The runner trains, scores, tabulates and plots every variant and seed.",
        paper="None: a check of the runner; a higher learning rate is better over a few steps.",
        better="lr-high", variants={"lr-low": ["--lr", "3e-4"], "lr-high": ["--lr", "1e-3"]},
        stages=(("align", 0.5), ("study-deepstack", 0.5)), steps=4, gpu_steps=4, tasks=("caption", "detail"),
        key=("detail",), flags=("--test_samples", "2", "--max_new_tokens", "8")),
}
# every run: checkpoints (for --resume) without evaluations in between, the test at the end
SHARED = ["--eval_every", "50", "--eval_samples", "0", "--test_samples", "64", "--log_every", "25"]
CPU = ["--device", "cpu"]
# the distill study: the teacher (train.py on the text questions; dev/LOG.md), the 2-layer student init, each
# phase's flags (about 20 samples a step, as train.py's 4 rows of 192 tokens) and the test
TEACHER = ["--stages", "text:400", "--eval_tasks", "lookup,text"]
STUDENT = ["--student", "toy-cpu", "--student_arch", "text.num_hidden_layers=2", "--steps", "0"]
SFT = ["--eval_every", "50", "--eval_samples", "0", "--test_samples", "0", "--log_every", "25"]
DISTILL = {"off": ["--phase", "off", "--batch_size", "20", "--lr", "1e-3", "--warmup", "30"],
           "on": ["--phase", "on", "--batch_size", "20", "--lr", "3e-4", "--warmup", "5", "--max_new_tokens", "64"]}
EVAL = ["--data", "toy", "--samples", "64", "--max_new_tokens", "64"]
KL = "held-out KL"
GPU_ROWS = ["--batch_size", "8", "--seq_len", "384"]     # toy-gpu's rows


def stage_flag(study, steps):
    """"align:45,study-deepstack:255": the steps shared out by the stages' shares, at least one each."""
    counts = [max(1, round(steps * share)) for _, share in study.stages[:-1]]
    counts.append(max(1, steps - sum(counts)))
    return ",".join(f"{name}:{n}" for (name, _), n in zip(study.stages, counts))


def shared_flags(study, args):
    """The train.py flags of every run of the study; on GPUs with data workers on the cores a run gets (packing
    video samples is slow; the rows do not depend on the workers)."""
    model = ["--preset", args.preset] + (GPU_ROWS if args.preset == "toy-gpu" else [])
    device = ["--data_workers", str(max(1, (os.cpu_count() or 1) // args.jobs - 1))] if args.gpu else CPU
    device = model + device
    return SHARED + device + list(study.flags) + ["--stages", stage_flag(study, args.steps),
                                                  "--eval_tasks", ",".join(study.tasks)]


def device_flags(args):
    return [] if args.gpu else CPU


def setup(study, args):
    """[step] to run before the study's runs: the distill study's teacher (unless --teacher) and student init. A
    step is (script, flags, out_dir or None, the file it writes last)."""
    if study.runner != "distill":
        return []
    steps = [] if args.teacher else [("train.py", SHARED + device_flags(args) + TEACHER + ["--seed", "0"],
                                      args.teacher_dir, os.path.join(args.teacher_dir, "test_scores.json"))]
    student = os.path.dirname(args.student_init)
    return steps + [("distill.py", ["--teacher", args.teacher_dir] + STUDENT + device_flags(args) + ["--seed", "0"],
                     student, os.path.join(args.student_init, "config.json"))]


def run_steps(study, args, flags, seed, out_dir):
    """The steps (as setup's) of one run: train.py or rl.py; or the distill study's phases, each from the model
    the one before made, then its test (eval.py); an SFT student's held-out KL comes from distill.py --steps 0."""
    seed, device = ["--seed", str(seed)], device_flags(args)
    if study.runner == "train":
        return [("train.py", shared_flags(study, args) + flags + seed, out_dir,
                 os.path.join(out_dir, "test_scores.json"))]
    if study.runner == "rl":
        return [("rl.py", ["--init_from", args.base, "--steps", str(args.steps), "--tasks", ",".join(study.tasks)]
                 + list(study.flags) + device + flags + seed, out_dir, os.path.join(out_dir, "hf", "config.json"))]
    steps, student = [], args.student_init
    for phase, share in flags:
        d, n = os.path.join(out_dir, phase), str(max(1, round(args.steps * share)))
        if phase == "sft":
            steps.append(("train.py", SFT + ["--init_from", student, "--stages", f"text:{n}"] + device + seed, d,
                          os.path.join(d, "hf", "config.json")))
            student, d = os.path.join(d, "hf"), os.path.join(out_dir, "kl")
            steps.append(("distill.py", ["--teacher", args.teacher_dir, "--student", student, "--steps", "0"] + device
                          + seed, d, os.path.join(d, "hf", "config.json")))
            continue
        cache = ["--teacher_cache", os.path.join(d, "teacher.safetensors")] if phase == "off" else []
        steps.append(("distill.py", ["--teacher", args.teacher_dir, "--student", student, "--steps", n] + cache
                      + DISTILL[phase] + device + seed, d, os.path.join(d, "hf", "config.json")))
        student = os.path.join(d, "hf")
    scores = os.path.join(out_dir, "scores.json")
    return steps + [("eval.py", EVAL + ["--init_from", student, "--tasks", ",".join(study.tasks), "--out", scores]
                     + device, None, scores)]


def runs(study, args):
    """[(variant, seed, out_dir, steps)] of the study, variants in order, then seeds."""
    return [(v, s, os.path.join(args.out_dir, v, f"seed{s}"), run_steps(study, args, flags, s,
                                                                        os.path.join(args.out_dir, v, f"seed{s}")))
            for v, flags in study.variants.items() for s in range(args.seeds)]


def command_line(python, scripts, step):
    """A step's command line: --resume when its folder holds a checkpoint."""
    script, flags, out_dir, _ = step
    where = ["--out_dir", out_dir] if out_dir else []
    resume = ["--resume"] if out_dir and os.path.isfile(os.path.join(out_dir, "latest")) else []
    return python + [os.path.join(scripts, script)] + flags + where + resume


def run_all(todo, python, scripts, jobs, gpus, say):
    """Run the runs' steps, `jobs` runs at once, each run's steps in order into its run.log; a step whose last file
    exists is skipped, a checkpointed one resumed. Returns the out_dirs of the runs that failed."""
    todo = [r for r in todo if not all(os.path.isfile(step[3]) for step in r[3])]
    work, failed, cores = queue.Queue(), [], os.cpu_count() or 1
    for r in todo:
        work.put(r)
    jobs = max(1, min(jobs, len(todo)))

    def worker(k):
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // jobs)))
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(k % gpus)
        while True:
            try:
                variant, seed, out_dir, steps = work.get_nowait()
            except queue.Empty:
                return
            t0, rc, resumed = time.time(), 0, False
            for step in steps:
                if os.path.isfile(step[3]):
                    continue
                os.makedirs(step[2] or out_dir, exist_ok=True)
                cmd = command_line(python, scripts, step)
                resumed |= "--resume" in cmd
                with open(os.path.join(out_dir, "run.log"), "a") as log:
                    rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
                if rc:
                    failed.append(out_dir)
                    break
            say(f"{variant}/seed{seed}: {'resumed, ' if resumed else ''}"
                f"{'failed (exit ' + str(rc) + ', see run.log)' if rc else 'done'} in {time.time() - t0:.0f} s")

    say(f"{len(todo)} runs to do, {jobs} at once")
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failed


# ----------------------------------------------------------------------------------------------------------
# The numbers


def mean_sd(xs):
    """(mean, sample standard deviation, n); the sd is None for one value."""
    n = len(xs)
    mean = sum(xs) / n
    return mean, (math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None), n


def columns(study):
    """The table's columns: the tasks (rl: each before and after; distill: and the held-out KL)."""
    if study.runner == "rl":
        return [c for t in study.tasks for c in (f"{t} (base)", t)]
    return list(study.tasks) + ([KL] if study.runner == "distill" else [])


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def run_scores(study, out_dir, steps):
    """{column: score} and {column: chance} of a finished run: train.py's test_scores.json; rl.py's first and last
    held-out evaluation (metrics.jsonl); eval.py's scores.json and the last distill.py step's last eval_kl."""
    if study.runner == "rl":
        path = os.path.join(out_dir, "metrics.jsonl")
        evals = [m["eval"] for m in read_jsonl(path) if "eval" in m]
        if len(evals) < 2:
            raise ValueError(f"{path}: {len(evals)} evaluations, not the first and the last; delete the run's "
                             "folder to run it again")
        from data.toyworld import TASKS
        scores = {c: evals[0 if c.endswith("(base)") else -1][c.removesuffix(" (base)")] for c in columns(study)}
        return scores, {c: TASKS[c.removesuffix(" (base)")].chance for c in scores}
    path = steps[-1][3]
    with open(path) as f:
        tests = json.load(f)
    missing = [t for t in study.tasks if t not in tests]
    if missing:
        raise ValueError(f"{path}: no score of {missing[0]!r}; delete the file to run it again")
    scores, chance = {t: tests[t]["score"] for t in study.tasks}, {t: tests[t]["chance"] for t in study.tasks}
    if study.runner == "distill":
        path = os.path.join([st for st in steps if st[0] == "distill.py"][-1][2], "metrics.jsonl")
        kls = [m["eval_kl"] for m in read_jsonl(path) if "eval_kl" in m]
        if not kls:
            raise ValueError(f"{path}: no held-out KL (eval_kl)")
        scores[KL], chance[KL] = kls[-1], None
    return scores, chance


def collect(study, todo):
    """{variant: {column: {mean, sd, n, scores}}} and {column: chance} from the finished runs."""
    table, chance = {}, {}
    for variant, _, out_dir, steps in todo:
        if not all(os.path.isfile(step[3]) for step in steps):
            continue
        scores, chances = run_scores(study, out_dir, steps)
        for c, x in scores.items():
            table.setdefault(variant, {}).setdefault(c, []).append(x)
        chance.update(chances)
    table = {v: {c: dict(zip(("mean", "sd", "n"), mean_sd(xs)), scores=xs) for c, xs in by_col.items()}
             for v, by_col in table.items()}
    return table, chance


def verdicts(study, table):
    """One line per key task and other variant: the report's variant minus the other, ± the standard error of the
    difference; "within noise" when the difference is at most one pooled sd, no verdict when a side has one seed."""
    lines = []
    for task in study.key:
        for other in study.variants:
            if other == study.better or task not in table.get(other, {}) or task not in table.get(study.better, {}):
                continue
            a, b = table[study.better][task], table[other][task]
            diff = a["mean"] - b["mean"]
            seeds = f"{a['n']} seeds" if a["n"] == b["n"] else f"{a['n']} and {b['n']} seeds"
            if a["sd"] is None or b["sd"] is None:
                lines.append(f"{study.better} - {other} on {task}: {diff:+.2f} ({seeds}): one seed, no error bar, "
                             "no verdict")
                continue
            se = math.sqrt(a["sd"] ** 2 / a["n"] + b["sd"] ** 2 / b["n"])
            pooled = math.sqrt((a["sd"] ** 2 + b["sd"] ** 2) / 2)
            if abs(diff) <= pooled:
                lines.append(f"{study.better} - {other} on {task}: {diff:+.2f} ± {se:.2f} ({seeds}), under one pooled "
                             f"sd ({pooled:.2f}): within noise")
            else:
                lines.append(f"{study.better} is {'better' if diff > 0 else 'worse'} than {other} on {task} by "
                             f"{abs(diff):.2f} ± {se:.2f} ({seeds}): "
                             f"{'agrees' if diff > 0 else 'disagrees'} with the paper")
    return lines


def markdown(study, table, chance):
    """The table: a row per variant, a column per task (columns), mean ± sd (n seeds); chance last."""
    def cell(r):
        return f"{r['mean']:.2f} ± {r['sd']:.2f} ({r['n']})" if r["sd"] is not None else f"{r['mean']:.2f} (1)"
    cols = columns(study)
    lines = ["| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for v in study.variants:
        if v in table:
            lines.append(f"| {v} | " + " | ".join(cell(table[v][c]) for c in cols) + " |")
    lines.append("| chance | " + " | ".join(f"{chance[c]:.2f}" if chance.get(c) is not None else "-"
                                            for c in cols) + " |")
    return "\n".join(lines)


def plot(name, study, table, chance, path):
    """Bars per score column (not the KL), one per variant, with sd error bars; chance as a dashed line over each
    column's bars."""
    plt = pyplot()
    variants, cols = [v for v in study.variants if v in table], [c for c in columns(study) if c != KL]
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(cols), 3.6))
    for i, v in enumerate(variants):
        xs = [t + (i - (len(variants) - 1) / 2) * width for t in range(len(cols))]
        rows = [table[v][c] for c in cols]
        ax.bar(xs, [r["mean"] for r in rows], width, yerr=[r["sd"] or 0 for r in rows], capsize=3, label=v)
    for t, c in enumerate(cols):
        if chance.get(c) is not None:
            ax.hlines(chance[c], t - 0.45, t + 0.45, colors="k", linestyles="dashed", linewidth=1)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylabel("test score (mean ± sd over seeds)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"{name}: {' vs '.join(variants)} (dashed: chance)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def reward_curves(name, study, todo, path):
    """The rl study's training reward per step (rl.py's metrics.jsonl), mean ± sd band over the seeds, one colour
    per variant. Returns {variant: {step: [rewards of the seeds]}}."""
    curves = {}
    for variant, _, out_dir, _ in todo:
        metrics = os.path.join(out_dir, "metrics.jsonl")
        if os.path.isfile(metrics):
            for m in read_jsonl(metrics):
                if "reward" in m:
                    curves.setdefault(variant, {}).setdefault(m["step"], []).append(m["reward"])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for variant, by_step in curves.items():
        steps = sorted(by_step)
        stats = [mean_sd(by_step[s]) for s in steps]
        means = [m for m, _, _ in stats]
        sds = [sd or 0 for _, sd, _ in stats]
        line, = ax.plot(steps, means, label=f"{variant} ({max(n for _, _, n in stats)} seeds)")
        ax.fill_between(steps, [m - d for m, d in zip(means, sds)], [m + d for m, d in zip(means, sds)],
                        color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training reward (sampled, mean ± sd)")
    ax.legend(fontsize=8)
    ax.set_title(f"{name}: {', '.join(study.tasks)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return curves


def shown(step):
    script, flags, out_dir, _ = step
    return "`" + shlex.join(["python", script] + flags + (["--out_dir", out_dir] if out_dir else [])) + "`"


def log_entry(study, args, command, table_md, lines, todo):
    """A dated dev/LOG.md entry: hypothesis, the report's claim, commands, table, verdict."""
    if study.runner == "train":
        each = shlex.join(["python", "train.py"] + shared_flags(study, args)) + " <variant's flags> --seed S " \
            f"--out_dir {args.out_dir}/<variant>/seedS"
        each = f"each run: `{each}` with " + "; ".join(f"{v}: `{shlex.join(f)}`" for v, f in study.variants.items())
        model = args.preset
    else:
        first = setup(study, args)
        each = (f"first {', then '.join(map(shown, first))}; " if first else "") + "each run (seed 0; other seeds " \
            "change --seed and the folders): " + "; ".join(f"{v}: " + ", then ".join(map(shown, steps))
                                                          for v, s, _, steps in todo if s == 0)
        model = f"from {args.base}" if study.runner == "rl" else f"teacher {args.teacher_dir}"
    return (f"## {datetime.date.today()}: ablation `{args.study}`, {' vs '.join(study.variants)} "
            f"({model}, {'GPU' if args.gpu else 'CPU'}, {args.steps} steps, {args.seeds} seeds)\n\n"
            f"- **Hypothesis.** {study.hypothesis}\n- **Paper.** {study.paper}\n"
            f"- **Command.** `{command}`; {each}.\n"
            f"- **Result** (test scores, mean ± sd over seeds, n in brackets; chance = the best score without "
            f"looking):\n\n{table_md}\n\n- **Verdict** (the report's variant minus each other, ± the standard error "
            f"of the difference):\n" + "".join(f"  - {line}\n" for line in lines) + "\n")


def add_to_log(path, entry):
    """Insert the entry above the newest one (the log runs newest first), or at the end of a log without entries."""
    text = open(path).read() if os.path.exists(path) else "# Development log\n\n"
    at = text.find("\n## ")
    text = text + "\n" + entry if at < 0 else text[:at + 1] + entry + text[at + 1:]
    with open(path, "w") as f:
        f.write(text)


# ----------------------------------------------------------------------------------------------------------


def main(argv=None, scripts=ROOT):
    """scripts: the folder of train.py, rl.py, distill.py and eval.py (tests give stand-ins)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="one of " + ", ".join(STUDIES))
    p.add_argument("--seeds", type=int, default=None, help="runs per variant, seeds 0..N-1 (default: 3; --gpu 4)")
    p.add_argument("--jobs", type=int, default=None, help="runs at once (default: the cores; --gpu: the GPUs)")
    p.add_argument("--steps", type=int, default=0, help="training steps of every run (default: the study's)")
    p.add_argument("--gpu", action="store_true", help="the toy-gpu preset and the study's GPU steps; each run on "
                   "one GPU, round robin (--jobs above the GPUs share them)")
    p.add_argument("--preset", default="", choices=["", "toy-cpu", "toy-gpu"], help="the model (default: toy-cpu; "
                   "--gpu: toy-gpu with rows of 8 x 384); --gpu --preset toy-cpu runs the CPU recipe on the GPU")
    p.add_argument("--out_dir", default="", help="default: out/ablate/<study> (out/ablate-gpu/<study> with --gpu)")
    p.add_argument("--log", default=os.path.join(ROOT, "dev", "LOG.md"), help="the log the entry goes to (default: "
                   "dev/LOG.md; '': none)")
    p.add_argument("--base", default="", help="rl: the model every run starts from (a train.py output directory "
                   "or a Hugging Face one)")
    p.add_argument("--tasks", default="", help="rl: the verifiable tasks trained, scored and judged (default: the "
                   "study's)")
    p.add_argument("--teacher", default="", help="distill: the teacher (default: trained first into "
                   "<out_dir>/teacher with train.py --stages text:400)")
    p.add_argument("--dry_run", action="store_true", help="print the runs' commands and stop")
    args = p.parse_args(argv)
    if args.study not in STUDIES:
        p.error(f"study={args.study!r}: known studies are {', '.join(STUDIES)}")
    args.seeds = args.seeds if args.seeds is not None else 4 if args.gpu else 3
    gpus = 0
    if args.gpu:
        import torch
        gpus = torch.cuda.device_count()
        if not gpus:
            p.error("--gpu: no GPU found")
    args.jobs = args.jobs if args.jobs is not None else gpus or os.cpu_count() or 1
    for flag, least in (("seeds", 1), ("jobs", 1), ("steps", 0)):
        if getattr(args, flag) < least:
            p.error(f"--{flag} {getattr(args, flag)}: must be >= {least}")
    study = STUDIES[args.study]
    args.preset = args.preset or ("toy-gpu" if args.gpu else "toy-cpu")
    args.steps = args.steps or (study.gpu_steps if args.preset == "toy-gpu" else study.steps)
    args.out_dir = args.out_dir or os.path.join("out", "ablate-gpu" if args.gpu else "ablate", args.study)
    if study.runner == "rl" and not os.path.exists(args.base):
        p.error(f"--base {args.base!r}: the rl study needs the model to start from (a train.py output directory)")
    if study.runner != "rl" and args.base:
        p.error(f"--base is for the rl study, not {args.study}")
    if args.teacher and study.runner != "distill":
        p.error(f"--teacher is for the distill study, not {args.study}")
    if args.teacher and not os.path.exists(args.teacher):
        p.error(f"--teacher {args.teacher!r}: no such directory")
    if args.tasks and study.runner != "rl":
        p.error(f"--tasks is for the rl study, not {args.study}")
    if args.tasks:
        from data.toyworld import TASKS
        unknown = [t for t in args.tasks.split(",") if t not in TASKS]
        if unknown:
            p.error(f"--tasks {args.tasks}: {unknown[0]!r} is not a toy world task ({', '.join(TASKS)})")
        study = dataclasses.replace(study, tasks=tuple(args.tasks.split(",")), key=tuple(args.tasks.split(",")))
    args.teacher_dir = args.teacher or os.path.join(args.out_dir, "teacher")
    args.student_init = os.path.join(args.out_dir, "student0", "hf")
    python, first, todo = [sys.executable], setup(study, args), runs(study, args)
    if args.dry_run:
        for step in first + [step for r in todo for step in r[3]]:
            print(shlex.join(command_line(python, scripts, step)))
        return None
    print(f"{args.study}: {study.hypothesis}\n{len(study.variants)} variants x {args.seeds} seeds -> {args.out_dir}")
    if first and run_all([("setup", 0, args.out_dir, first)], python, scripts, 1, gpus, print):
        sys.exit(f"error: the study's setup failed; see {args.out_dir}/run.log")
    failed = run_all(todo, python, scripts, args.jobs, gpus, lambda s: print(s, flush=True))
    table, chance = collect(study, todo)
    if not table:
        sys.exit(f"error: no run of {args.study} finished; see the run.log files under {args.out_dir}")
    table_md, lines = markdown(study, table, chance), verdicts(study, table)
    command = shlex.join(["python", "ablate.py"] + (sys.argv[1:] if argv is None else list(argv)))
    results = dict(study=args.study, hypothesis=study.hypothesis, paper=study.paper, command=command,
                   date=str(datetime.date.today()), seeds=args.seeds, variants=table, chance=chance, verdicts=lines,
                   failed=failed)
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(f"# {args.study}\n\n{study.hypothesis}\n\n{table_md}\n\n" + "\n".join(f"- {x}" for x in lines) + "\n")
    plot(args.study, study, table, chance, os.path.join(args.out_dir, "results.png"))
    if study.runner == "rl":
        results["rewards"] = reward_curves(args.study, study, todo, os.path.join(args.out_dir, "rewards.png"))
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\n{table_md}\n\n" + "\n".join(lines))
    if args.log:
        add_to_log(args.log, log_entry(study, args, command, table_md, lines, todo))
    print(f"\nwrote {args.out_dir}/results.md, results.json, results.png" + (", rewards.png" if "rewards" in results else "")
          + (f"; an entry in {args.log}" if args.log else ""))
    if failed:
        sys.exit(f"error: {len(failed)} runs failed: " + ", ".join(failed))
    return results


if __name__ == "__main__":
    main()
