"""
Conversations from a JSONL file: one JSON object per line, in the `messages` layout of the Hugging Face chat tools.

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "imgs/cat.png"},
                                               {"type": "text", "text": "What animal is this?"}]},
                  {"role": "assistant", "content": "A cat."}],
     "task": "animals", "answer": "cat", "metric": "exact"}

- content is a string or a list of parts: {"type": "text", "text": ...}, {"type": "image", "image": path},
  {"type": "video", "video": path} ("path" may stand for "image" / "video"; a video given as a list of frame
  files takes "fps"). Paths are relative to the JSONL file's folder, or absolute.
- The LLaMA-Factory / ShareGPT-style layout is read too: "<image>" and "<video>" markers in the text of a message,
  filled in order from top-level "images" / "videos" lists.
- "task", "answer" and "metric" (a name in eval.METRICS) are optional: evaluation groups scores by task (default
  "default") and compares the reply to "answer" (default: the last assistant message, which is then not shown).
  "reward" (optional, a name in rl.REWARDS) is how rl.py scores a reply against "answer" (default: the metric).

The file is read once, line by line, when the dataset is made: every line is parsed and checked (an error names
the file, the line and the problem); only the byte offset of each line is kept. A sample is read from disk again
when it is asked for; its images and videos are opened by the processor, later.
"""
import json
import os
import random
import re
from array import array

from data import BadSample

ROLES = ("system", "user", "assistant", "tool")
MEDIA = ("image", "video")


class JsonlDataset:
    stages, chance, budgets, splits = {}, {}, {}, False

    def __init__(self, path, seed=0, require_assistant=True, skip_bad=False):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such JSONL file")
        self.path, self.seed, self.require_assistant = path, seed, require_assistant
        self.folder = os.path.dirname(os.path.abspath(path))
        self.offsets = array("q")          # byte offset of each usable line
        self.lines = array("q")            # its line number (1-based), for messages
        self.bad, self.tasks = 0, {}
        offset = 0
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if raw.strip():
                    try:
                        sample = self.parse(raw, lineno)
                    except BadSample:
                        if not skip_bad:
                            raise
                        self.bad += 1
                    else:
                        self.offsets.append(offset)
                        self.lines.append(lineno)
                        self.tasks[sample["task"]] = self.tasks.get(sample["task"], 0) + 1
                offset += len(raw)
        if not self.offsets:
            raise BadSample(f"{path}: no usable line" + (f" ({self.bad} bad ones skipped)" if self.bad else ""))

    def __len__(self):
        return len(self.offsets)

    def read(self, i):
        """The i-th usable line as a sample."""
        with open(self.path, "rb") as f:
            f.seek(self.offsets[i])
            return self.parse(f.readline(), self.lines[i])

    def sample(self, index, stage=None):
        """Sample `index` of a training run: a line drawn uniformly (with replacement) by a generator seeded with
        the index, so any index can be built on its own."""
        return self.read(random.Random(f"jsonl/{self.seed}/{index}").randrange(len(self)))

    def eval_samples(self, n=None):
        """Every line (the first n of each task with n), its prompt without the reference answer."""
        out, seen = [], {}
        for i in range(len(self)):
            s = self.read(i)
            seen[s["task"]] = seen.get(s["task"], 0) + 1
            if n is None or seen[s["task"]] <= n:
                out.append(s)
        return out

    def score(self, sample, reply):
        from eval import METRICS
        return METRICS[sample["metric"]](reply, sample)

    # -- one line -> one sample, checked --

    def parse(self, raw, lineno):
        where = f"{self.path}:{lineno}"

        def bad(problem):
            return BadSample(f"{where}: {problem}")
        try:
            line = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"not valid JSON ({e})") from None
        if not isinstance(line, dict):
            raise bad(f"expected a JSON object, got {type(line).__name__}")
        messages = line.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad('no "messages" list (expected {"messages": [{"role": ..., "content": ...}, ...]})')
        media = {kind: list(line.get(kind + "s") or []) for kind in MEDIA}     # the "<image>"-marker layout
        messages = [self.message(m, i, media, bad) for i, m in enumerate(messages)]
        for kind in MEDIA:
            if media[kind]:
                raise bad(f'{len(media[kind])} of the "{kind}s" are not used by any <{kind}> marker')
        task, metric = line.get("task", "default"), line.get("metric", "exact")
        from eval import METRICS
        if not isinstance(task, str) or not task:
            raise bad(f'"task" must be a non-empty string, got {task!r}')
        if metric not in METRICS:
            raise bad(f'unknown "metric" {metric!r}; known: {sorted(METRICS)}')
        reward = line.get("reward")
        from rl import REWARDS
        if reward is not None and reward not in REWARDS:
            raise bad(f'unknown "reward" {reward!r}; known: {sorted(REWARDS)}')
        answer = line.get("answer")
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if answer is None:
            if not replies:
                raise bad('no assistant message and no "answer": nothing to learn or to score')
            prompt, answer = messages[:replies[-1]], text_of(messages[replies[-1]])
        else:
            if not isinstance(answer, (str, int, float)):
                raise bad(f'"answer" must be a string or a number, got {type(answer).__name__}')
            if self.require_assistant and not replies:
                raise bad("no assistant message: nothing to learn (an \"answer\" alone is for evaluation data)")
            prompt, answer = (messages[:replies[-1]] if replies else messages), str(answer)
        if not any(m["role"] == "user" for m in prompt):
            raise bad("no user message before the reply")
        sample = dict(messages=messages, prompt=prompt, task=task, answer=answer, metric=metric, origin=where)
        return sample if reward is None else dict(sample, reward=reward)

    def message(self, m, i, media, bad):
        if not isinstance(m, dict) or "role" not in m:
            raise bad(f'message {i} is not an object with a "role"')
        if m["role"] not in ROLES:
            raise bad(f"message {i} has role {m['role']!r}; expected one of {ROLES}")
        content = m.get("content")
        if content is None and m["role"] == "assistant" and m.get("tool_calls"):
            return dict(m)
        if isinstance(content, str):
            parts = self.markers(content, media, i, bad) if "<image>" in content or "<video>" in content \
                else content
        elif isinstance(content, list):
            parts = [self.part(p, i, bad) for p in content]
        else:
            raise bad(f"message {i}: content must be a string or a list of parts, got {type(content).__name__}")
        return {**m, "content": parts}

    def part(self, p, i, bad):
        if not isinstance(p, dict):
            raise bad(f"message {i}: a content part must be an object, got {p!r}")
        kind = p.get("type") or next((k for k in ("text", *MEDIA) if k in p), None)
        if kind == "text":
            if not isinstance(p.get("text"), str):
                raise bad(f'message {i}: a text part needs a "text" string')
            return {"type": "text", "text": p["text"]}
        if kind in MEDIA:
            source = p.get(kind, p.get("path"))
            if source is None:
                raise bad(f'message {i}: an {kind} part needs "{kind}" (or "path"): a file name')
            return {**{k: v for k, v in p.items() if k != "path"}, "type": kind, kind: self.resolve(source, bad)}
        raise bad(f"message {i}: unknown content part type {kind!r}; expected text, image or video")

    def markers(self, text, media, i, bad):
        """'<image>What is this?' with "images": ["a.png"] -> [image a.png, text 'What is this?']."""
        parts = []
        for piece in re.split(r"(<image>|<video>)", text):
            kind = piece[1:-1] if piece in ("<image>", "<video>") else None
            if kind is None:
                if piece:
                    parts.append({"type": "text", "text": piece})
                continue
            if not media[kind]:
                raise bad(f'message {i}: more <{kind}> markers than entries in "{kind}s"')
            parts.append({"type": kind, kind: self.resolve(media[kind].pop(0), bad)})
        return parts

    def resolve(self, source, bad):
        """A media path relative to the JSONL file's folder (or absolute); frame lists resolve each frame."""
        if isinstance(source, list):
            return [self.resolve(s, bad) for s in source]
        if not isinstance(source, str) or not source:
            raise bad(f"a media path must be a non-empty string, got {source!r}")
        if source.startswith(("http://", "https://")):
            raise bad(f"{source}: URLs are not fetched; download the file and give its path")
        source = source.removeprefix("file://")
        return source if os.path.isabs(source) else os.path.join(self.folder, source)


def text_of(message):
    """The text of a message's content (a string, or its text parts joined)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content or [] if p.get("type") == "text")
