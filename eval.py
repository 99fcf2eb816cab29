"""
Evaluation on answers: greedy replies to a dataset's prompts, each scored against its reference answer.

    python eval.py --init_from out/toy/hf --data test.jsonl                 # a Hugging Face dir or a checkpoint
    python eval.py --init_from out/toy --data toy --samples 64 --out scores.json

Scorers (METRICS), each (reply, sample) -> float in [0, 1], comparing the reply's final answer (the text after its
last </think>) with sample["answer"]:
    exact    equal after normalising (lower case, single spaces, no surrounding punctuation, no leading "the")
    choice   the same multiple-choice letter ("B", "(B)", "B. a cat", "The answer is B.")
    number   the same first number ("7", "7 apples", "There are 7.")
    bbox     a box [x1, y1, x2, y2] in the [0, 1000] frame ("bbox_2d": [...] in JSON, or the first four numbers)
             with IoU >= 0.5 against the reference box
    tiou     temporal IoU of two spans in seconds ("<1.0 seconds> to <3.5 seconds>", "from 1 to 3.5 s": the
             first two numbers), the overlap itself (mean tIoU over samples)
The toy world's tasks use these where they fit and add scorers of their own (captions, points, event times).

The needle in a haystack (the paper's long-video check): accuracy of finding the one odd moment of a toy-world video,
over video length x needle depth, including lengths beyond training, plain and with YaRN (needle_map):

    python eval.py --needle out/toy --lengths 16,32,64,128 --depths 0,0.25,0.5,0.75,1 --n 16 --yarn 8 --out needle
"""
import argparse
import dataclasses
import json
import os
import re
import sys
from contextlib import nullcontext

import torch

# ----------------------------------------------------------------------------------------------------------
# Reading answers


def normalize(text):
    """Lower case, no surrounding punctuation or spaces, single spaces, no leading "the "."""
    text = " ".join(text.lower().split()).strip(" .,!?;:\"'")
    return text.removeprefix("the ")


def final_answer(text):
    """The part of a reply after its reasoning: everything after the last </think>."""
    return text.rsplit("</think>", 1)[-1]


NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def first_number(text):
    m = NUMBER.search(text)
    return float(m.group()) if m else None


def json_list(key, text):
    """The numbers in the list after "key": in a JSON-ish reply, e.g. "bbox_2d": [1, 2, 3, 4]."""
    m = re.search(rf'"?{key}"?\s*:\s*\[([^\]]*)\]', text)
    return [float(v) for v in NUMBER.findall(m.group(1))] if m else []


def iou(a, b):
    """Intersection over union of two boxes (x1, y1, x2, y2)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0, w) * max(0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box(text):
    """The box of a reply: its "bbox_2d" list, else the first four numbers of its final answer."""
    values = json_list("bbox_2d", text) or [float(v) for v in NUMBER.findall(final_answer(text))][:4]
    return values if len(values) == 4 and values[0] < values[2] and values[1] < values[3] else None


CHOICE = re.compile(r"(?:^|answer is|answer:)\s*\(?([A-Z])\b(?![a-z'])|^\(?([A-Z])[).:]", re.IGNORECASE)


def choice_letter(text):
    """The option letter of a multiple-choice reply: "B", "(B)", "B. a cat", "The answer is B."."""
    text = final_answer(text).strip()
    m = CHOICE.search(text)
    return (m.group(1) or m.group(2)).upper() if m else None


def span(text):
    """(start, end) seconds: the first two numbers of a reply's final answer, in order."""
    values = [float(v) for v in NUMBER.findall(final_answer(text))][:2]
    return tuple(sorted(values)) if len(values) == 2 else None


# ----------------------------------------------------------------------------------------------------------
# Scorers


def score_exact(reply, sample):
    return float(normalize(final_answer(reply)) == normalize(final_answer(sample["answer"])))


def score_choice(reply, sample):
    guess = choice_letter(reply)
    return float(guess is not None and guess == choice_letter(sample["answer"]))


def score_number(reply, sample):
    truth, guess = first_number(final_answer(sample["answer"])), first_number(final_answer(reply))
    return float(guess is not None and guess == truth)


def score_bbox(reply, sample):
    """Right when the box overlaps the reference with IoU >= 0.5 (the usual detection threshold)."""
    guess, truth = box(reply), box(sample["answer"])
    return float(guess is not None and truth is not None and iou(guess, truth) >= 0.5)


def score_tiou(reply, sample):
    guess, truth = span(reply), span(sample["answer"])
    if guess is None or truth is None:
        return 0.0
    inter = max(0.0, min(guess[1], truth[1]) - max(guess[0], truth[0]))
    union = max(guess[1], truth[1]) - min(guess[0], truth[0])
    return inter / union if union > 0 else float(guess == truth)


METRICS = dict(exact=score_exact, choice=score_choice, number=score_number, bbox=score_bbox, tiou=score_tiou)


# ----------------------------------------------------------------------------------------------------------
# Evaluating a model


@torch.no_grad()
def evaluate(model, processor, dataset, n, device, autocast, max_new_tokens, batch_size=64):
    """
    Greedy replies to dataset.eval_samples(n) (n per task; None: all), scored by dataset.score. Returns
    {task: dict(score, n, chance, kinds)}, with kinds {kind: mean score} where samples name a "kind" (a task's
    question families), and {task: (sample, reply)}, the first of each task. Every rank of a distributed run
    runs the same batches (identical greedy decodes keep FSDP's collectives in step).
    """
    from sample import generate
    model.eval()
    by_task = {}
    for s in dataset.eval_samples(n):
        by_task.setdefault(s["task"], []).append(s)
    results, examples = {}, {}
    for task, samples in by_task.items():
        by_kind = {}                                                 # kind -> the scores of its samples
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            batch = processor([s["prompt"] for s in chunk], add_generation_prompt=True)
            batch = {k: v.to(device) for k, v in batch.items() if v is not None and k != "labels"}
            with autocast:
                out = generate(model, **batch, max_new_tokens=max_new_tokens, temperature=0.0,
                               eos_ids=processor.tok.eos_ids, pad_id=processor.tok.pad_id)
            for s, ids in zip(chunk, out.tolist()):
                reply = reply_text(processor.tok, ids)
                by_kind.setdefault(s.get("kind", ""), []).append(dataset.score(s, reply))
                examples.setdefault(task, (s, reply))
        kinds = {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}
        results[task] = dict(score=sum(map(sum, by_kind.values())) / len(samples), n=len(samples),
                             chance=dataset.chance.get(task), kinds=kinds if len(kinds) > 1 else {})
    model.train()
    return results, examples


def reply_text(tok, ids):
    """A generated reply's text: its ids (a list) decoded without special tokens (and without the ids past the
    tokenizer's vocabulary that the model's padded head can emit), stripped."""
    return tok.decode([i for i in ids if i < tok.n_vocab], skip_special_tokens=True).strip()


def report(results, title):
    """A table of per-task scores, with chance and the kinds of question where known."""
    lines = [f"{title:24s} score      n   chance   by kind of question"]
    for task, r in results.items():
        chance = f"{r['chance']:6.2f}" if r["chance"] is not None else "     -"
        kinds = ", ".join(f"{k} {x:.2f}" for k, x in r["kinds"].items())
        lines.append(f"  {task:22s} {r['score']:5.2f} {r['n']:6d}   {chance}   {kinds}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Needle in a haystack: accuracy over video length x needle depth


def needle_cell(frames, depth):
    """The task name of one cell of the map: its samples are grouped (and scored) under it."""
    return f"needle {frames} frames depth {depth:g}"


class NeedleGrid:
    """
    The toy world's needle videos of a length x depth grid as a dataset for `evaluate` (data/__init__.py): one task
    per cell (needle_cell), whose n samples are needle_sample(world, split, i, frames, depth) for i < n. Within a
    length the same n haystacks and needles fill every depth, only the needle's place changes.
    """

    def __init__(self, world, lengths, depths, split="test"):
        from data.toyworld import TASKS
        self.world, self.lengths, self.depths, self.split, self.task = world, lengths, depths, split, TASKS["needle"]
        self.chance = {needle_cell(f, d): self.task.chance for f in lengths for d in depths}

    def eval_samples(self, n):
        from data.toyworld import needle_sample
        return [dict(s, task=needle_cell(f, d), prompt=s["messages"][:1],
                     origin=f"toy world {self.split} needle #{i} ({f} frames, depth {d:g})")
                for f in self.lengths for d in self.depths for i in range(n)
                for s in [needle_sample(self.world, self.split, i, f, d)]]

    def score(self, sample, reply):
        return self.task.score(reply, sample)


def check_needle_grid(processor, world, lengths, depths):
    """
    ValueError naming the bad value, before anything is rendered: lengths that are no needle video (a multiple of 2
    frames, at least 4: one temporal patch per slot) or that the processor would not keep whole (it would sample
    fewer frames: video_fps, video_max_frames; or shrink them: the clip's video_max_pixels budget), so that a cell
    of F frames really reads F frames' worth of tokens; lengths not increasing; depths outside [0, 1] or repeated.
    """
    from data.toyworld import VIDEO_FPS, slots_of
    from processor import sample_frame_indices, smart_resize_video
    if not depths or len(set(depths)) != len(depths):
        raise ValueError(f"depths={list(depths)}: must be a non-empty list without repeats")
    if not lengths or any(a >= b for a, b in zip(lengths, lengths[1:])):
        raise ValueError(f"lengths={list(lengths)}: must be a non-empty increasing list (the map's x axis)")
    for d in depths:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1:
            raise ValueError(f"depths: {d!r} is not a needle depth, a number from 0 (the first temporal patch) to 1 "
                             "(the last)")
    size = world.image_size
    for f in lengths:
        try:
            slots_of(f)
        except ValueError as e:
            raise ValueError(f"lengths: {f!r} frames is not a needle video ({e})") from None
        kept = len(sample_frame_indices(f, VIDEO_FPS, processor.video_fps, processor.video_min_frames,
                                        processor.video_max_frames))
        if kept != f:
            raise ValueError(f"lengths: the processor keeps {kept} of the {f} frames of a {VIDEO_FPS} fps video "
                             f"(its video_fps={processor.video_fps:g}, video_max_frames={processor.video_max_frames}): "
                             f"use lengths of at most {processor.video_max_frames} frames, or a processor that keeps "
                             "them all")
        h, w = smart_resize_video(f, size, size, processor.temporal_patch_size, processor.factor,
                                  processor.video_min_pixels, processor.video_max_pixels)
        if (h, w) != (size, size):
            raise ValueError(f"lengths: {f} frames of {size}x{size} px exceed the processor's pixel budget for a "
                             f"clip (video_max_pixels={processor.video_max_pixels}), which shrinks them to {w}x{h}: "
                             f"use at most {processor.video_max_pixels // size ** 2} frames")


def needle_map(model, processor, lengths, depths, n, world=None, split="test", device="cpu", autocast=nullcontext(),
               max_new_tokens=32, batch_size=32):
    """
    Accuracy [len(lengths), len(depths)] float64 of greedy replies to "Which object is shown for only one moment of
    the video?" (the needle task's scorer: the needle's colour and shape), n videos a cell (NeedleGrid), generated
    and scored in batches by `evaluate`. lengths: frames per video (check_needle_grid); depths: the needle's place,
    0 the first temporal patch, 1 the last; world: the toy world (default: seed 0, 96 px images, as train.py's).
    """
    from data.toyworld import ToyWorld
    world = world or ToyWorld()
    check_needle_grid(processor, world, lengths, depths)
    results, _ = evaluate(model, processor, NeedleGrid(world, lengths, depths, split), n, device, autocast,
                          max_new_tokens, batch_size)
    return torch.tensor([[results[needle_cell(f, d)]["score"] for d in depths] for f in lengths],
                        dtype=torch.float64)                                             # [L, D]


def needle_length(model, processor, world, frames):
    """(tokens, positions) of a whole needle sample (question and answer) of `frames` frames: the row it fills and
    the RoPE positions it spans (max position + 1; fewer than tokens, since a frame group's tokens share positions)."""
    from data.toyworld import needle_sample
    s = needle_sample(world, "train", 0, frames)
    batch = processor([s["messages"]])
    ids = batch["input_ids"]                                                            # [1, S]
    _, rope_deltas = model.get_position_ids(ids, None, batch["image_grid_thw"], batch["video_grid_thw"],
                                            batch["video_second_per_grid"])             # [1, 1]
    return ids.shape[1], ids.shape[1] + int(rope_deltas[0, 0])


def with_yarn(cfg, factor, original):
    """
    A copy of the model config `cfg` with YaRN on its RoPE: text.rope_scaling = {"rope_type": "yarn", "factor":
    factor, "original_max_position_embeddings": original}, in the reference's meaning: `original` is the length the
    model was trained at, and the RoPE is stretched to factor x original. A model takes it as `model.cfg = ...` (its
    RoPE frequencies are made from the config at every forward). ValueError for a RoPE that is scaled already.
    """
    if cfg.text.rope_scaling is not None:
        raise ValueError(f"the model's RoPE is scaled already (text.rope_scaling={cfg.text.rope_scaling}): YaRN is "
                         "applied to a plain RoPE")
    scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, rope_scaling=scaling))


def plot_needle(path, lengths, depths, tokens, maps, train_frames):
    """The heat maps side by side (maps: {title: accuracy [L, D]}): x the video length in frames (and tokens), y
    the needle's depth, colour the accuracy, each cell's value written in it, the training length marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(maps), figsize=(1.2 * len(lengths) * len(maps) + 2, 0.6 * len(depths) + 2),
                             squeeze=False)
    trained = sum(f <= train_frames for f in lengths) - 0.5          # the border after the lengths trained at
    for ax, (title, acc) in zip(axes[0], maps.items()):
        acc = acc.numpy()                                                     # [L, D]
        image = ax.imshow(acc.T, cmap="RdYlGn", vmin=0, vmax=1, origin="upper", aspect="auto")
        for i in range(len(lengths)):
            for j in range(len(depths)):
                ax.text(i, j, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [f"{f}\n({t})" for f, t in zip(lengths, tokens)])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("video length: frames (tokens)")
        ax.set_ylabel("needle depth")
        ax.axvline(trained, color="black", linestyle="--")
        ax.text(trained, -0.55, f"trained: {train_frames} frames ", fontsize=8, ha="right", va="bottom")
        ax.set_title(title, pad=18)
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def needle_main(args):
    """--needle: the map of a checkpoint, and with --yarn the map with YaRN beside it -> needle.json, needle.png."""
    from data.toyworld import ToyWorld
    from sample import load_model, load_processor
    try:
        world = ToyWorld(image_size=args.image_size)
        path, _, processor = load_processor(args.needle)
        check_needle_grid(processor, world, args.lengths, args.depths)
        device = torch.device(args.device)
        dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if device.type == "cuda" else None
        model = load_model(path, device, dtype)
        original = needle_length(model, processor, world, args.train_frames)[1]
        yarn_cfg = with_yarn(model.cfg, args.yarn, original) if args.yarn else None
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    tokens = [needle_length(model, processor, world, f)[0] for f in args.lengths]
    run = dict(n=args.n, world=world, split=args.split, device=device, max_new_tokens=args.max_new_tokens,
               batch_size=args.batch_size)
    maps = {"RoPE": needle_map(model, processor, args.lengths, args.depths, **run)}
    result = dict(checkpoint=args.needle, lengths=args.lengths, depths=args.depths, n=args.n, tokens=tokens,
                  train_frames=args.train_frames, train_positions=original, accuracy=maps["RoPE"].tolist())
    if yarn_cfg:
        model.cfg = yarn_cfg
        title = f"YaRN x{args.yarn:g} over {original} positions"
        maps[title] = needle_map(model, processor, args.lengths, args.depths, **run)
        result["yarn"] = dict(rope_scaling=yarn_cfg.text.rope_scaling, accuracy=maps[title].tolist())
    for title, acc in maps.items():
        print(f"{title}: accuracy, rows {args.lengths} frames, columns depth {args.depths}\n{acc.numpy().round(2)}")
    out = args.out or "."
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "needle.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot_needle(os.path.join(out, "needle.png"), args.lengths, args.depths, tokens, maps, args.train_frames)
    print(f"wrote {os.path.join(out, 'needle.json')} and needle.png")
    return result


def number_list(kind):
    """An argparse type: 'a,b,c' -> a list of `kind` (int or float), the bad item named."""
    def parse(text):
        try:
            return [kind(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: must be {kind.__name__}s separated by commas") from None
    return parse


def main(argv=None):
    p = argparse.ArgumentParser(description="Score a Qwen3-VL checkpoint's greedy answers on a dataset, or map its "
                                "needle-in-a-haystack accuracy over video length x depth (--needle).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--init_from", default="", help="a Hugging Face Qwen3-VL directory, or a train.py output "
                   "directory / checkpoint (its latest checkpoint)")
    p.add_argument("--data", default="", help="JSONL files (a.jsonl,b.jsonl) or 'toy' (the toy world)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="the toy world's split")
    p.add_argument("--samples", type=int, default=0, help="samples per task (0: every line of a file; the toy "
                   "world: 64)")
    p.add_argument("--tasks", default="", help="score only these tasks, comma-separated (default: all of the data's)")
    p.add_argument("--out", default="", help="write the scores as JSON here; --needle: the directory for "
                   "needle.json and needle.png (default: the current one)")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bf16 on a GPU")
    p.add_argument("--image_size", type=int, default=96, help="the toy world's image side in pixels (as trained)")
    # the needle map
    p.add_argument("--needle", default="", metavar="CHECKPOINT", help="map this checkpoint's accuracy at finding "
                   "the needle of toy-world videos over --lengths x --depths (instead of --init_from / --data)")
    p.add_argument("--lengths", type=number_list(int), default=[16, 32, 64, 128], help="video lengths in frames")
    p.add_argument("--depths", type=number_list(float), default=[0, 0.25, 0.5, 0.75, 1],
                   help="needle depths, 0 (the first temporal patch) to 1 (the last)")
    p.add_argument("--n", type=int, default=16, help="videos per cell of the map")
    p.add_argument("--train_frames", type=int, default=16, help="the video length the model was trained at "
                   "(the toy recipe's needle videos): marked on the map, and YaRN's original length")
    p.add_argument("--yarn", type=float, default=0, metavar="FACTOR", help="also map the model with YaRN of this "
                   "factor (> 1) on its RoPE, original_max_position_embeddings = the positions of a needle sample "
                   "of --train_frames frames (the length the model was trained at, the reference's meaning)")
    args = p.parse_args(argv)
    for name in ("samples", "max_new_tokens", "batch_size", "n"):
        if getattr(args, name) < (0 if name == "samples" else 1):
            p.error(f"--{name} {getattr(args, name)}: must be >= {0 if name == 'samples' else 1}")
    if args.needle:
        if args.init_from or args.data:
            p.error("--needle maps a checkpoint on toy-world videos: give it without --init_from / --data")
        if args.yarn and args.yarn <= 1:
            p.error(f"--yarn {args.yarn:g}: the factor YaRN stretches the RoPE by must be > 1")
        if not (args.train_frames >= 4 and args.train_frames % 2 == 0):
            p.error(f"--train_frames {args.train_frames}: a needle video has a multiple of 2 frames, at least 4")
        return needle_main(args)
    if not (args.init_from and args.data):
        p.error("give --init_from and --data (or --needle CHECKPOINT)")
    from data import open_data
    from sample import load
    try:
        dataset = open_data(args.data, split=args.split, image_size=args.image_size, strict=False,
                            tasks=args.tasks.split(",") if args.tasks else None)
        device = torch.device(args.device)
        dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if device.type == "cuda" else None
        model, tok, processor = load(args.init_from, device, dtype)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    n = args.samples or (64 if dataset.splits else None)
    results, examples = evaluate(model, processor, dataset, n, device, nullcontext(), args.max_new_tokens,
                                 args.batch_size)
    print(report(results, f"{args.data}"))
    for task, (s, reply) in examples.items():
        print(f"\n[{task}] {s['origin']}\n  reply: {reply}\n  truth: {s['answer']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
