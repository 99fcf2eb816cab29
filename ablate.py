"""
Design ablations at toy scale, with error bars: do the design choices of the Qwen3-VL report hold on the toy world?

    python ablate.py deepstack                      # DeepStack on vs off: 2 variants x 3 seeds on the CPU
    python ablate.py mrope --jobs 16                # interleaved vs chunked MRoPE vs text-only (1-D) positions
    python ablate.py timestamps --gpu               # textual timestamps vs T-RoPE vs none: toy-gpu, more steps
    python ablate.py deepstack --dry_run            # print the train.py commands and stop

A study is a hypothesis, the report's direction (the variant it says is better), its variants (name -> extra
train.py flags), the train.py flags every run shares (stages and their task mix, steps, test samples) and the tasks
it reports. Each run (variant x seed) is one `python train.py ... --seed S --out_dir <out_dir>/<variant>/seed<S>`,
its output in train.log there; --jobs run at once, each with cores // jobs threads (--gpu: one GPU each, round
robin). A run whose test_scores.json exists is done and skipped; one with a checkpoint is resumed (--resume), so the
same command continues a stopped study. Then: results.md and results.json (per task, mean ± sd over the seeds),
results.png (bars with sd error bars, chance marked) in --out_dir, and a dated entry in dev/LOG.md with a verdict per
key task, computed from the numbers.

Every run starts from scratch. A common base run shared by the variants would be cheaper, but DeepStack off has
fewer parameters, and a base trained under one position layout or time encoding favours that one. The seed also
picks the toy world's training and test samples (train.py --seed), so the spread over seeds includes theirs.
"""
import argparse
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
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
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
    flags: tuple = ()       # more train.py flags for every run


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


def runs(study, args):
    """[(variant, seed, out_dir, train.py flags)] of the study, variants in order, then seeds."""
    return [(v, s, os.path.join(args.out_dir, v, f"seed{s}"), shared_flags(study, args) + flags + ["--seed", str(s)])
            for v, flags in study.variants.items() for s in range(args.seeds)]


def run_all(todo, train_cmd, jobs, gpus, say):
    """Run the train.py commands, `jobs` at once; a finished run (test_scores.json) is skipped, a checkpointed one
    resumed. Returns the out_dirs of the runs that failed."""
    todo = [r for r in todo if not os.path.isfile(os.path.join(r[2], "test_scores.json"))]
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
                variant, seed, out_dir, flags = work.get_nowait()
            except queue.Empty:
                return
            os.makedirs(out_dir, exist_ok=True)
            resume = ["--resume"] if os.path.isfile(os.path.join(out_dir, "latest")) else []
            t0 = time.time()
            with open(os.path.join(out_dir, "train.log"), "a") as log:
                rc = subprocess.run(train_cmd + flags + ["--out_dir", out_dir] + resume, env=env, stdout=log,
                                    stderr=subprocess.STDOUT).returncode
            if rc:
                failed.append(out_dir)
            say(f"{variant}/seed{seed}: {'resumed, ' if resume else ''}"
                f"{'failed (exit ' + str(rc) + ', see train.log)' if rc else 'done'} in {time.time() - t0:.0f} s")

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


def collect(study, todo):
    """{variant: {task: {mean, sd, n, scores}}} and {task: chance} from the finished runs' test_scores.json."""
    table, chance = {}, {}
    for variant, _, out_dir, _ in todo:
        path = os.path.join(out_dir, "test_scores.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            scores = json.load(f)
        for task in study.tasks:
            if task not in scores:
                raise ValueError(f"{path}: no score of {task!r}; delete the file to run it again")
            table.setdefault(variant, {}).setdefault(task, []).append(scores[task]["score"])
            chance[task] = scores[task]["chance"]
    table = {v: {t: dict(zip(("mean", "sd", "n"), mean_sd(xs)), scores=xs) for t, xs in by_task.items()}
             for v, by_task in table.items()}
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
    """The table: a row per variant, a column per task, mean ± sd (n seeds); chance last."""
    def cell(r):
        return f"{r['mean']:.2f} ± {r['sd']:.2f} ({r['n']})" if r["sd"] is not None else f"{r['mean']:.2f} (1)"
    lines = ["| variant | " + " | ".join(study.tasks) + " |", "|---" * (len(study.tasks) + 1) + "|"]
    for v in study.variants:
        if v in table:
            lines.append(f"| {v} | " + " | ".join(cell(table[v][t]) for t in study.tasks) + " |")
    lines.append("| chance | " + " | ".join(f"{chance[t]:.2f}" if chance.get(t) is not None else "-"
                                            for t in study.tasks) + " |")
    return "\n".join(lines)


def plot(name, study, table, chance, path):
    """Bars per task, one per variant, with sd error bars; chance as a dashed line over each task's bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    variants = [v for v in study.variants if v in table]
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(study.tasks), 3.6))
    for i, v in enumerate(variants):
        xs = [t + (i - (len(variants) - 1) / 2) * width for t in range(len(study.tasks))]
        rows = [table[v][t] for t in study.tasks]
        ax.bar(xs, [r["mean"] for r in rows], width, yerr=[r["sd"] or 0 for r in rows], capsize=3, label=v)
    for t, task in enumerate(study.tasks):
        if chance.get(task) is not None:
            ax.hlines(chance[task], t - 0.45, t + 0.45, colors="k", linestyles="dashed", linewidth=1)
    ax.set_xticks(range(len(study.tasks)), study.tasks)
    ax.set_ylabel("test score (mean ± sd over seeds)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"{name}: {' vs '.join(variants)} (dashed: chance)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_entry(study, args, command, table_md, lines):
    """A dated dev/LOG.md entry: hypothesis, the report's claim, commands, table, verdict."""
    each = shlex.join(["python", "train.py"] + shared_flags(study, args)) + " <variant's flags> --seed S --out_dir " \
        + f"{args.out_dir}/<variant>/seedS"
    return (f"## {datetime.date.today()}: ablation `{args.study}`, {' vs '.join(study.variants)} "
            f"({args.preset}, {'GPU' if args.gpu else 'CPU'}, {args.steps} steps, {args.seeds} seeds)\n\n"
            f"- **Hypothesis.** {study.hypothesis}\n- **Paper.** {study.paper}\n"
            f"- **Command.** `{command}`; each run: `{each}` with "
            + "; ".join(f"{v}: `{shlex.join(f)}`" for v, f in study.variants.items()) + ".\n"
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


def main(argv=None, train_cmd=None):
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
    p.add_argument("--dry_run", action="store_true", help="print the runs' train.py commands and stop")
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
    train_cmd = train_cmd or [sys.executable, os.path.join(ROOT, "train.py")]
    todo = runs(study, args)
    if args.dry_run:
        for _, _, out_dir, flags in todo:
            print(shlex.join(train_cmd + flags + ["--out_dir", out_dir]))
        return None
    print(f"{args.study}: {study.hypothesis}\n{len(study.variants)} variants x {args.seeds} seeds -> {args.out_dir}")
    failed = run_all(todo, train_cmd, args.jobs, gpus, lambda s: print(s, flush=True))
    table, chance = collect(study, todo)
    if not table:
        sys.exit(f"error: no run of {args.study} finished; see the train.log files under {args.out_dir}")
    table_md, lines = markdown(study, table, chance), verdicts(study, table)
    command = shlex.join(["python", "ablate.py"] + (sys.argv[1:] if argv is None else list(argv)))
    results = dict(study=args.study, hypothesis=study.hypothesis, paper=study.paper, command=command,
                   date=str(datetime.date.today()), seeds=args.seeds, variants=table, chance=chance, verdicts=lines,
                   failed=failed)
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(f"# {args.study}\n\n{study.hypothesis}\n\n{table_md}\n\n" + "\n".join(f"- {x}" for x in lines) + "\n")
    plot(args.study, study, table, chance, os.path.join(args.out_dir, "results.png"))
    print(f"\n{table_md}\n\n" + "\n".join(lines))
    if args.log:
        add_to_log(args.log, log_entry(study, args, command, table_md, lines))
    print(f"\nwrote {args.out_dir}/results.md, results.json, results.png"
          + (f"; an entry in {args.log}" if args.log else ""))
    if failed:
        sys.exit(f"error: {len(failed)} runs failed: " + ", ".join(failed))
    return results


if __name__ == "__main__":
    main()
