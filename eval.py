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
"""
import argparse
import json
import re
import sys

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


def main(argv=None):
    p = argparse.ArgumentParser(description="Score a Qwen3-VL checkpoint's greedy answers on a dataset.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--init_from", required=True, help="a Hugging Face Qwen3-VL directory, or a train.py output "
                   "directory / checkpoint (its latest checkpoint)")
    p.add_argument("--data", required=True, help="JSONL files (a.jsonl,b.jsonl) or 'toy' (the toy world)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="the toy world's split")
    p.add_argument("--samples", type=int, default=0, help="samples per task (0: every line of a file; the toy "
                   "world: 64)")
    p.add_argument("--tasks", default="", help="score only these tasks, comma-separated (default: all of the data's)")
    p.add_argument("--out", default="", help="write the scores as JSON here")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bf16 on a GPU")
    args = p.parse_args(argv)
    for name in ("samples", "max_new_tokens", "batch_size"):
        if getattr(args, name) < (0 if name == "samples" else 1):
            p.error(f"--{name} {getattr(args, name)}: must be >= {0 if name == 'samples' else 1}")
    from contextlib import nullcontext
    from data import open_data
    from sample import load
    try:
        dataset = open_data(args.data, split=args.split, strict=False,
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
