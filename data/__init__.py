"""
The data interface: what train.py, eval.py (and the post-training scripts) need from a dataset, nothing more.

A dataset is one split of conversations. It has

    sample(index, stage=None) -> dict   a pure function of (index, stage): the same arguments, the same sample
    eval_samples(n) -> [dict]           what evaluation scores: n per task (a generator) or the whole file
    score(sample, reply) -> float       the reply's score in [0, 1] (eval.METRICS, by the sample's "metric")
    chance -> {task: float}             the score without looking (where known), drawn beside each task's curve
    stages -> {name: base stage}        stage names of its own (a recipe's), each a setting of one of train.STAGES
    budgets -> {min_pixels, max_pixels} image pixel budgets its images are made for ({}: the processor's)
    splits -> bool                      whether it makes its own validation and test splits (a generator does)

and every sample is a dict with
    messages  the chat as Processor takes it: [{"role": "user" | "assistant" | "system" | "tool",
              "content": str | [{"type": "text", "text": ...} | {"type": "image", "image": path or PIL image}
              | {"type": "video", "video": path or frames, "fps": ...}]}, ...]
    task      a name to group scores by ("default" where the data names none)
    answer    the reference answer for evaluation (default: the last assistant message's text)
    metric    how a reply is scored against the answer (eval.METRICS; default "exact")
    origin    where it came from, for error messages ("data/train.jsonl:12", "toy world train #7")

Two implementations: data.jsonl.JsonlDataset (your conversations, one JSON object per line) and data.toy.ToyData
(the built-in toy world with its training recipe). `Mixture` draws from several with weights; `Tasks` keeps some
of a dataset's tasks. `open_data` turns the --data string of train.py / eval.py / rl.py into a dataset.
"""
import random


class BadSample(ValueError):
    """A sample that cannot be used: malformed, missing media, longer than a row. The message names its origin."""


class Mixture:
    """Several datasets drawn with weights: sample `index` comes from dataset d with probability w_d / sum(w),
    decided by a generator seeded with the index alone, so the mixture stays a pure function of the index."""

    def __init__(self, parts, seed=0):
        if not parts or any(w <= 0 for _, w in parts):
            raise ValueError(f"a mixture needs datasets with positive weights, got {[w for _, w in parts]}")
        self.datasets, self.weights, self.seed = [d for d, _ in parts], [float(w) for _, w in parts], seed
        self.chance = {t: c for d in self.datasets for t, c in d.chance.items()}
        self.stages = {n: s for d in self.datasets for n, s in d.stages.items()}
        self.budgets = next((d.budgets for d in self.datasets if d.budgets), {})
        self.splits = False

    def sample(self, index, stage=None):
        d = random.Random(f"mixture/{self.seed}/{index}").choices(range(len(self.datasets)), self.weights)[0]
        return self.datasets[d].sample(index, stage)

    def eval_samples(self, n):
        return [dict(s, part=d) for d, data in enumerate(self.datasets) for s in data.eval_samples(n)]

    def score(self, sample, reply):
        return self.datasets[sample["part"]].score(sample, reply)


class Tasks:
    """
    A dataset restricted to some of its tasks. Sample `index` is the first sample of one of them among the
    dataset's samples [index * SPAN, (index + 1) * SPAN), so it stays a pure function of the index; evaluation
    scores only these tasks.
    """
    SPAN = 256

    def __init__(self, data, tasks):
        known = set(getattr(data, "tasks", ())) | set(data.chance)     # a JSONL file's tasks; the toy world's
        unknown = sorted(set(tasks) - known) if known else []
        if not tasks or unknown:
            raise ValueError(f"tasks {sorted(tasks)}: " + (f"unknown {unknown}; known: {sorted(known)}" if unknown
                                                          else "name at least one"))
        self.data, self.tasks = data, set(tasks)
        self.chance = {t: c for t, c in data.chance.items() if t in self.tasks}
        self.stages, self.budgets, self.splits = data.stages, data.budgets, data.splits

    def sample(self, index, stage=None):
        for i in range(index * self.SPAN, (index + 1) * self.SPAN):
            s = self.data.sample(i, stage)
            if s["task"] in self.tasks:
                return s
        raise BadSample(f"no sample of the tasks {sorted(self.tasks)} among samples [{index * self.SPAN}, "
                        f"{(index + 1) * self.SPAN}) of the data (stage {stage!r})")

    def eval_samples(self, n):
        return [s for s in self.data.eval_samples(n) if s["task"] in self.tasks]

    def score(self, sample, reply):
        return self.data.score(sample, reply)


def parse_data(spec):
    """'a.jsonl:3,b.jsonl:1' -> [('a.jsonl', 3.0), ('b.jsonl', 1.0)]; a part without a weight weighs 1."""
    parts = []
    for item in spec.split(","):
        path, sep, weight = item.rpartition(":")
        if not sep or not weight.replace(".", "", 1).isdigit() or not weight.isascii():
            path, weight = item, "1"
        if not path:
            raise ValueError(f"--data {spec!r}: empty file name in {item!r}")
        if float(weight) <= 0:
            raise ValueError(f"--data {spec!r}: the weight of {path!r} must be > 0, got {weight}")
        parts.append((path, float(weight)))
    return parts


def open_data(spec, split="train", seed=0, image_size=96, strict=True, skip_bad=False, tasks=None):
    """The dataset a --data string names: JSONL files and 'toy' (the toy world's `split`), with weights. A file
    is one split (train.py's --data and --eval_data are separate files); it is checked line by line first.
    `tasks` (names): keep only these tasks (the toy world evaluates its studies' tasks only when named)."""
    from data.jsonl import JsonlDataset
    from data.toy import ToyData

    def one(path):
        if path == "toy":
            return ToyData(seed=seed, split=split, image_size=image_size, tasks=tasks)
        return JsonlDataset(path, seed=seed, require_assistant=strict, skip_bad=skip_bad)
    parts = [(one(path), w) for path, w in parse_data(spec)]
    data = parts[0][0] if len(parts) == 1 else Mixture(parts, seed)
    return Tasks(data, tasks) if tasks else data
