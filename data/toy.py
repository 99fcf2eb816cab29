"""
The toy recipe: how `python train.py` trains a tiny Qwen3-VL on the toy world (data/toyworld.py) on a laptop CPU in
about 15 minutes. train.py takes these settings when --data is `toy` (its default); flags and --config still win.
Everywhere else its defaults are the paper's and the checkpoints'. One line of why per value here; what was
measured to choose them is in dev/LOG.md.
"""
from data.toyworld import ALL, STUDY, TASKS, ToyWorld

SETTINGS = dict(
    preset="toy-cpu",               # 3.6 M parameters: minutes per thousand steps on two cores
    vocab_size=1024,                # a BPE trained on the world's text: 1k tokens cover it, the head stays small
    image_size=96,                  # 3 x 3 cells of 32 px: one visual token per object
    stages="align:240,shapes:160,pretrain:600,video:480,long:140,binding:120,sft:480",
    batch_size=4,                   # 4 rows of 192 tokens (about 5 samples each): more steps beat bigger ones here
    seq_len=192,
    long_seq_mult=2,                # long-stage rows of 384 tokens: several videos and comparisons a row, as tuned
    lr=1e-3,                        # a model this small learns fast; the vision path collapses at 3e-3
    warmup=30,
    sft_lr_ratio=0.5,               # post-training restarts at half the peak, a cosine of its own
    vision_lr_mult=0.1,             # a ViT from scratch at the full rate loses its features before the LLM reads them
    pos_embed_std=0.5,              # the position table at the patch features' scale, so tokens know where they are
    eval_every=400,
    eval_samples=24,                # per task, on the validation split
    test_samples=64,                # per task, on the test split at the end
    max_new_tokens=64,              # the longest toy reply (a video's timestamp checks) fits
    skip_bad_samples=True,          # a rare long sample that fits no row is skipped (counted in the log)
)

# From stage 1 on, boxes and points come twice as often as each other task: a box scores when it lands in the named
# object's cell, and at equal weights that was learned in few runs.
STAGE1 = {**ALL, "bbox": 2.0, "point": 2.0}
# Text-only colour look-ups, from the second part of stage 1 on: they teach the stop of the object-by-object colour
# reply (make_attribute) without vision.
LOOKUPS = {"lookup": 3.0}

# Each stage of the recipe: the paper's stage it is a setting of (train.STAGES) and its task mix (task -> weight).
STAGES = {
    "align": ("align", {"caption": 1.0}),                        # stage 0: only the mergers learn, on captions
    # stage 1 opens on the names of the shapes: straight into the full mix, some runs never named shapes
    "shapes": ("pretrain", {"caption": 1.0, "attribute": 1.0}),
    # then every task but video; videos join once the model tells shapes apart (from the start they cost shapes)
    "pretrain": ("pretrain", {t: w for t, w in STAGE1.items() if t != "video"}),
    "video": ("pretrain", {**STAGE1, "video": 3.0, **LOOKUPS}),  # videos three times: their share holds
    "long": ("long", {**STAGE1, "video": 4.0, "compare": 3.0, **LOOKUPS}),   # stage 2: more of the long samples
    # SFT opens on two-object attribute questions (the look-up by shape that captions never ask for) and videos
    # (without them the timestamp checks fade meanwhile)
    "binding": ("sft", {"binding": 1.0, "video": 1.0}),
    "sft": ("sft", {**STAGE1, "video": 3.0, "binding": 3.0, **LOOKUPS}),
    # text-only questions at SFT's loss: the data of distill.py (the paper distils on text-only data), and of an SFT
    # baseline to compare it with (python train.py --stages text:N)
    "text": ("sft", {"text": 1.0, "lookup": 1.0}),
    # The mixes of ablate.py's studies, each after a short `align`: the study's tasks, with captions (they teach the
    # object names the answers use) and tasks of the same input that the toy run learns (attributes and words;
    # boxes and event times), so that a variant that breaks its input shows there too.
    "study-deepstack": ("pretrain", {"caption": 1.0, "attribute": 1.0, "ocr": 1.0, "detail": 3.0}),
    "study-video": ("pretrain", {"caption": 1.0, "bbox": 1.0, "video": 1.0, "vground": 3.0, "needle": 2.0}),
}
MIXES = {name: mix for name, (_, mix) in STAGES.items()}


class ToyData:
    """One split of the toy world behind the data interface (data/__init__.py): samples drawn from the stage's mix,
    evaluation on n samples of every task (`tasks`; default: the toy run's, all but the studies'), each task's own
    scorer and chance level."""
    stages = {name: base for name, (base, _) in STAGES.items()}
    chance = {name: task.chance for name, task in TASKS.items()}
    splits = True

    def __init__(self, seed=0, split="train", image_size=96, tasks=None):
        self.world, self.split, self.eval_tasks = ToyWorld(seed=seed, image_size=image_size), split, tasks
        # images of image_size^2 pixels come out at that size: 9 visual tokens for 96 x 96
        self.budgets = dict(min_pixels=image_size ** 2 // 2, max_pixels=image_size ** 2 * 4)

    def sample(self, index, stage=None):
        s = self.world.sample(self.split, index, mix=MIXES[stage] if stage else ALL)
        return dict(s, prompt=s["messages"][:1], origin=f"toy world {self.split} #{index}")

    def eval_samples(self, n):
        if not n:
            raise ValueError("the toy world has no end: evaluate a number of samples per task (--eval_samples, "
                             "--test_samples >= 1)")
        tasks = [t for t in TASKS if (t in self.eval_tasks if self.eval_tasks else t not in STUDY)]
        return [dict(s, prompt=s["messages"][:1], origin=f"toy world {self.split} #{i}")
                for task in tasks for i in range(n) for s in [self.world.sample(self.split, i, task=task)]]

    def score(self, sample, reply):
        return TASKS[sample["task"]].score(reply, sample)

    def text_corpus(self, n):
        """Texts to train a tokenizer on (train.py trains a BPE on them for the toy presets)."""
        return self.world.text_corpus(n)
