"""train.py: packing, labels, exact resume, crash-safe checkpoints, FSDP2 equivalence (gloo, CPU), bad settings."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from data.toy import ToyData
from data.toyworld import ToyWorld
from eval import evaluate
from model import Qwen3VL, Qwen3VLConfig
from processor import Processor
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--vocab_size", "400", "--batch_size", "2", "--seq_len", "128", "--eval_samples", "1", "--test_samples", "1",
        "--max_new_tokens", "3", "--log_every", "100", "--warmup", "2"]


@pytest.fixture(scope="module")
def toy():
    world = ToyWorld(seed=0, image_size=96)
    tok = Tokenizer.train(world.text_corpus(1000), 400)
    cfg = Qwen3VLConfig.from_preset("toy-cpu", text=dict(vocab_size=448), image_token_id=tok.image_token_id,
                                    video_token_id=tok.video_token_id, vision_start_token_id=tok.vision_start_id,
                                    vision_end_token_id=tok.vision_end_id)
    model = Qwen3VL(cfg).eval()
    model.init_weights(seed=1)
    processor = Processor(tok, min_pixels=64 * 64 // 2, max_pixels=64 * 64 * 4)
    return world, tok, model, train.Packer(ToyData(seed=0), processor, cfg)


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [m["loss"] for m in map(json.loads, f) if "loss" in m]


def test_sft_labels_are_the_assistant_reply(toy):
    world, tok, _, packer = toy
    for i in range(20):
        s = world.sample("train", i)
        enc = packer.encode(s, "assistant")
        target = enc["ids"][enc["labels"] != -100].tolist()
        assert tok.decode(target) == s["answer"] + "<|im_end|>"


def test_pretrain_labels_are_every_text_token(toy):
    world, tok, _, packer = toy
    s = world.sample("train", 3, task="video")
    enc = packer.encode(s, "text")
    visual = (enc["ids"] == tok.image_token_id) | (enc["ids"] == tok.video_token_id)
    assert visual.any()
    assert ((enc["labels"] == -100) == visual | (torch.arange(len(visual)) == 0)).all()


def test_packed_row_equals_samples_alone(toy):
    """Attention stays inside each packed sample and its positions restart: the logits of every sample in a row
    equal those of the sample run alone."""
    world, tok, model, packer = toy
    row = packer.row(5, "pretrain", 256)
    assert len(row) >= 2
    batch = train.collate([row], 256, tok.pad_id)
    labels, real = batch.pop("labels"), batch.pop("real")
    with torch.no_grad():
        packed, _ = model(**{k: v for k, v in batch.items() if v is not None})
        n = 0
        for s in row:
            alone, _ = model(s["ids"][None], pixel_values=s["pv"], image_grid_thw=s["ig"],
                             pixel_values_videos=s["pvv"], video_grid_thw=s["vg"])
            torch.testing.assert_close(packed[0, n:n + len(s["ids"])], alone[0], rtol=0, atol=1e-5)
            n += len(s["ids"])
    assert (labels[0, n:] == -100).all() and real[0, :n].all() and not real[0, n:].any()


def test_rows_are_a_function_of_their_number(toy):
    world, tok, model, packer = toy
    a = [s["ids"] for s in packer.row(7, "sft", 128)]
    other = train.Packer(ToyData(seed=0), packer.processor, model.cfg)
    other.row(3, "sft", 128)
    b = [s["ids"] for s in other.row(7, "sft", 128)]
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_evaluate_scores_each_kind_of_question(toy, monkeypatch):
    """A stand-in for generation that answers only "Which image has more <shape>?" right: the compare task's
    score is the share of those questions and its kinds read 1 for "shape", 0 for the colour and all-shape ones."""
    import sample
    world, tok, model, packer = toy
    samples = [world.sample("val", i, task="compare") for i in range(12)]      # what evaluate will ask, in order

    def fake_generate(model, input_ids, **kw):
        assert len(input_ids) == len(samples)                                   # one batch: row i asks sample i
        replies = []
        for ids, s in zip(input_ids.tolist(), samples):
            assert s["question"] in tok.decode(ids)
            replies.append(tok.encode(s["answer"] if s["kind"] == "shape" else "Maybe."))
        width = max(map(len, replies))
        return torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in replies])

    monkeypatch.setattr(sample, "generate", fake_generate)
    from data import toy
    monkeypatch.setattr(toy, "TASKS", {"compare": toy.TASKS["compare"]})
    results, _ = evaluate(model, packer.processor, ToyData(seed=0, split="val"), 12, "cpu", train.nullcontext(), 8)
    kind_of = [s["kind"] for s in samples]
    assert set(kind_of) == {"shape", "color", "all"}
    assert results["compare"]["kinds"] == {"all": 0.0, "color": 0.0, "shape": 1.0}
    assert results["compare"]["score"] == pytest.approx(kind_of.count("shape") / 12)
    assert results["compare"]["n"] == 12 and results["compare"]["chance"] == 0.5


def test_lr_schedule_restarts_for_sft_only_after_other_stages():
    """One warmup + cosine over the run; an SFT stage after other stages restarts at sft_lr_ratio * lr (warmup,
    then its own cosine to min_lr_ratio of that), and the steps before it are as without the restart."""
    def lr(step, args):
        return train.lr_at(step, args, train.post_start(args.stage_list, ToyData))

    a = train.parse_args(["--stages", "pretrain:100,sft:50", "--lr", "1e-3", "--warmup", "5", "--min_lr_ratio", "0.1"])
    b = train.parse_args(["--stages", "pretrain:100,sft:50", "--lr", "1e-3", "--warmup", "5", "--min_lr_ratio", "0.1",
                          "--sft_lr_ratio", "0"])
    assert [lr(s, a) for s in range(100)] == [lr(s, b) for s in range(100)]
    assert lr(4, a) == pytest.approx(1e-3) and lr(149, b) == pytest.approx(1e-4, rel=0.01)
    assert lr(100, a) == pytest.approx(0.5e-3 / 5) and lr(104, a) == pytest.approx(0.5e-3)
    assert lr(149, a) == pytest.approx(0.5e-4, rel=0.02)
    assert 0 < lr(99, b) - lr(100, b) < 2e-5  # no restart: the cosine goes on
    c = train.parse_args(["--stages", "sft:50", "--lr", "1e-5", "--warmup", "5"])  # SFT alone: --lr, not a fraction
    assert max(lr(s, c) for s in range(50)) == pytest.approx(1e-5)
    d = train.parse_args(["--stages", "pretrain:100,binding:20,sft:30", "--lr", "1e-3", "--warmup", "5",
                          "--min_lr_ratio", "0.1"])  # binding then sft: one post-training cosine from the binding
    assert [lr(s, d) for s in range(100, 150)] == [lr(s, a) for s in range(100, 150)]


def test_resume_gives_the_same_loss_curve(tmp_path):
    """Stop (SIGKILL) a run right after its first checkpoint, resume it: bitwise the uninterrupted run's losses."""
    args = TINY + ["--stages", "align:2,pretrain:4,sft:2", "--eval_every", "2"]
    train.main(args + ["--out_dir", str(tmp_path / "a")])
    b = str(tmp_path / "b")
    proc = subprocess.Popen([sys.executable, "train.py", *args, "--out_dir", b], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not os.path.exists(os.path.join(b, "latest")) and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open(os.path.join(b, "latest")) as f:
        stopped_at = f.read()
    assert stopped_at == "ckpt-0000002", stopped_at
    train.main(args + ["--out_dir", b, "--resume"])
    assert losses(b) == losses(tmp_path / "a") and len(losses(b)) == 8


KILLED_SAVE = r"""
import sys, time, torch
sys.path.insert(0, ".")
import train
from model import Qwen3VL, Qwen3VLConfig
from processor import Processor
from tokenizer import Tokenizer
out = sys.argv[1]
args = train.parse_args(["--out_dir", out])
tok = Tokenizer.train(["a tiny corpus"] * 10, 300)
model = Qwen3VL(Qwen3VLConfig.from_preset("toy-cpu", text=dict(vocab_size=320)))
model.init_weights(seed=1)
opt = train.make_optimizer(model, args, torch.device("cpu"))
processor = Processor(tok)
train.save_checkpoint(out, model, opt, tok, processor, 1, args, 0)
print("saved", flush=True)
model.init_weights(seed=2)
slow = tok.save
tok.save = lambda path: (print("saving", flush=True), time.sleep(30), slow(path))   # the kill lands here
train.save_checkpoint(out, model, opt, tok, processor, 2, args, 0)
"""


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip() == "saved"
    assert proc.stdout.readline().strip() == "saving"          # ckpt-0000002.tmp is half written
    proc.kill()
    proc.wait()
    assert os.path.isdir(tmp_path / "ckpt-0000002.tmp")
    path = train.latest_checkpoint(str(tmp_path))
    assert path.endswith("ckpt-0000001")
    model = Qwen3VL(Qwen3VLConfig.from_preset("toy-cpu", text=dict(vocab_size=320)))
    args = train.parse_args([])
    step = train.load_checkpoint(path, model, train.make_optimizer(model, args, torch.device("cpu")), 0)
    expected = Qwen3VL(Qwen3VLConfig.from_preset("toy-cpu", text=dict(vocab_size=320)))
    expected.init_weights(seed=1)
    assert step == 1
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))


def test_fsdp_two_ranks_equal_one(tmp_path):
    """torchrun with 2 CPU ranks (gloo, FSDP2) and 1 process with the same global batch: same losses and weights;
    the 2-rank checkpoint resumes in 1 process. The two sum gradients in different orders (fp32 rounding, ~1e-9);
    Adam divides each gradient by its own running scale, so a weight whose gradient is that small moves by up
    to ~lr either way: weights differed by 7e-6 at lr 3e-3 and by 3e-6 at lr 1e-4, so this test trains at 1e-5."""
    args = TINY + ["--stages", "align:1,pretrain:3", "--lr", "1e-5", "--eval_every", "2", "--seed", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = str(tmp_path / "two")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py", *args,
                    "--batch_size", "1", "--out_dir", two], cwd=ROOT, env=env, check=True, capture_output=True)
    train.main(args + ["--out_dir", str(tmp_path / "one")])
    a, b = losses(two), losses(tmp_path / "one")
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6
    m2, m1 = Qwen3VL.from_pretrained(os.path.join(two, "hf")), Qwen3VL.from_pretrained(str(tmp_path / "one" / "hf"))
    for (name, p), q in zip(m2.state_dict().items(), m1.state_dict().values()):
        assert (p - q).abs().max() <= 1e-6, name
    # the 2-rank checkpoint, resumed in one process for 2 more steps
    train.main(args + ["--stages", "align:1,pretrain:5", "--out_dir", two, "--resume"])
    assert len(losses(two)) == 6 and losses(two)[:4] == a


def test_pos_embed_std_sets_only_the_position_embedding(tmp_path):
    """--pos_embed_std draws the ViT's position table at that scale and leaves every other initial tensor alone
    (checked after one align step, which trains only the mergers)."""
    train.main(TINY + ["--stages", "align:1", "--eval_every", "0", "--pos_embed_std", "0.3",
                       "--out_dir", str(tmp_path / "o")])
    model = Qwen3VL.from_pretrained(tmp_path / "o" / "hf")
    pos = model.visual.pos_embed.weight
    assert torch.equal(pos, Qwen3VL.initial_value("visual.pos_embed.weight", pos.shape, 0, std=0.3))
    assert 0.27 < pos.std() < 0.33
    for name, p in model.named_parameters():
        if train.is_vision_tower(name) and name != "visual.pos_embed.weight":
            assert torch.equal(p, Qwen3VL.initial_value(name, p.shape, 0)), name


def test_export_dtype_bfloat16(tmp_path):
    """--export_dtype bfloat16 writes the export as bf16 tensors (half the bytes, as released checkpoints): the
    config says so, and each tensor is the trained fp32 weight rounded (the ViT tower, untouched by one align step,
    is its initial value rounded)."""
    train.main(TINY + ["--stages", "align:1", "--eval_every", "0", "--export_dtype", "bfloat16",
                       "--out_dir", str(tmp_path / "o")])
    hf = tmp_path / "o" / "hf"
    assert json.loads((hf / "config.json").read_text())["dtype"] == "bfloat16"     # transformers 5's key
    model = Qwen3VL.from_pretrained(hf)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for name, p in model.named_parameters():
        if train.is_vision_tower(name):
            std = 0.5 if name == "visual.pos_embed.weight" else 0.02
            assert torch.equal(p, Qwen3VL.initial_value(name, p.shape, 0, std).to(torch.bfloat16)), name


def test_unknown_config_key(tmp_path, capsys):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"lr": 1e-3, "learning_rate": 1e-3}))
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(cfg)])
    assert "unknown key(s) ['learning_rate']" in capsys.readouterr().err
    cfg.write_text(json.dumps({"lr": 1e-3, "batch_size": 3}))
    assert train.parse_args(["--config", str(cfg), "--batch_size", "5"]).batch_size == 5   # flags win
    assert train.parse_args(["--config", str(cfg)]).lr == 1e-3                              # the file beats the recipe
    cfg.write_text(json.dumps({"data": "my.jsonl"}))
    assert train.parse_args(["--config", str(cfg)]).lr == 1e-5         # not toy data: the general defaults
    for bad, words in ((["--stages", "sft:1٣"], "bad stage 'sft:1٣'"), (["--batch_size", "0"],
                       "--batch_size 0: must be >= 1"), (["--lr", "nan"], "--lr nan: must be a finite number"),
                       (["--preset", "toy-xl"], "invalid choice: 'toy-xl'")):
        with pytest.raises(SystemExit):
            train.parse_args(bad)
        assert words in capsys.readouterr().err, bad


def test_the_toy_recipe_sets_the_defaults_only_for_toy_data():
    from data.toy import SETTINGS
    toy, general = train.parse_args([]), train.parse_args(["--data", "x.jsonl"])
    for key, value in SETTINGS.items():
        assert getattr(toy, key) == value, key
    assert (general.lr, general.vision_lr_mult, general.pos_embed_std, general.stages) == (1e-5, 1.0, 0.02, "sft:1000")


def test_bad_init_from(tmp_path, toy):
    with pytest.raises(ValueError, match="no config.json"):
        train.main(TINY + ["--init_from", str(tmp_path / "missing"), "--out_dir", str(tmp_path / "o")])
    _, tok, model, _ = toy
    model.save_pretrained(tmp_path / "ckpt")
    tok.save(str(tmp_path / "ckpt" / "tokenizer.tiktoken"))
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["text_config"]["hidden_size"] = 128                     # the weights are of another width
    cfg["vision_config"]["out_hidden_size"] = 128
    cfg["text_config"]["num_attention_heads"] = 4
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="embed_tokens.weight' has shape"):
        train.main(TINY + ["--init_from", str(tmp_path / "ckpt"), "--out_dir", str(tmp_path / "o")])


def test_plan_of_every_released_size(capsys):
    train.main(["--plan", "--preset", "all", "--seq_len", "4096", "--batch_size", "1", "--n_gpus", "8"])
    out = capsys.readouterr().out
    assert all(f"qwen3-vl-{n}" in out for n in ("2b", "4b", "8b", "32b", "30b-a3b", "235b-a22b"))
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "all"])
    assert "--preset all: only with --plan" in capsys.readouterr().err


def test_plan_counts_and_checkpointing():
    for name, n in (("qwen3-vl-2b", 2_127_532_032), ("qwen3-vl-8b", 8_767_123_696)):
        cfg = Qwen3VLConfig.from_preset(name)
        full, ac = train.plan(cfg, 4096, 1, 2, False), train.plan(cfg, 4096, 1, 2, True)
        assert full["params"] == n and full["state"] == ac["state"]
        assert ac["activations"] < full["activations"] / 2
        assert train.plan(cfg, 4096, 1, 4, False)["state"] < full["state"]
        assert 6 * n < full["flops_per_token"] < 6 * n * 1.5


class Payload:
    """Unpickling this runs `touch <marker>`: the test fails if the file appears."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_nothing_in_a_checkpoint_runs_code(tmp_path):
    """Payloads planted in every file of a checkpoint that could hold a pickle (the distributed checkpoint's
    metadata, its tensor data and non-tensor entries, the RNG file) are refused with an error and never run."""
    import io
    import pickle
    from sample import load
    run = tmp_path / "run"
    train.main(TINY + ["--stages", "align:2", "--eval_every", "1", "--eval_samples", "0", "--out_dir", str(run)])
    newest, older = train.checkpoints(str(run))             # --keep_checkpoints 2: steps 2 and 1
    assert sorted(os.listdir(newest)) == ["config.json", "dcp", "preprocessor_config.json", "rng-0.safetensors",
                                         "tokenizer.tiktoken", "train_state.json", "video_preprocessor_config.json"]
    marker = tmp_path / "pwned"
    with open(os.path.join(newest, "dcp", ".metadata"), "wb") as f:
        pickle.dump(Payload(marker), f)
    with pytest.raises(pickle.UnpicklingError, match="refers to posix.system"):
        train.verify_checkpoint(newest)
    assert train.latest_checkpoint(str(run)) == older       # the damaged newest is skipped for the older one
    model, _, _ = load(str(run))
    with pytest.raises(pickle.UnpicklingError):             # a non-tensor entry (the optimizer's settings)
        train.SafePlanner().load_bytes(None, io.BytesIO(pickle.dumps(Payload(marker))))
    for name in ["rng-0.safetensors"] + [f"dcp/{f}" for f in os.listdir(os.path.join(older, "dcp"))
                                         if f.endswith(".distcp")]:
        with open(os.path.join(older, name), "wb") as f:     # a pickle where safetensors / tensor data belong
            pickle.dump(Payload(marker), f)
    with pytest.raises(Exception, match="header|Error|error"):
        train.load_rng(os.path.join(older, "rng-0.safetensors"))
    with pytest.raises(ValueError, match="the checkpoint cannot be read: EOFError"):
        train.load_weights(older, model)
    with pytest.raises(ValueError, match="no usable checkpoint"):
        train.latest_checkpoint(str(run))
    assert not marker.exists()


def test_resume_falls_back_from_a_truncated_checkpoint(tmp_path, capsys):
    run = str(tmp_path / "run")
    args = TINY + ["--stages", "align:3", "--eval_every", "1", "--eval_samples", "0", "--out_dir", run,
                   "--keep_checkpoints", "2"]
    train.main(args)
    newest, older = train.checkpoints(run)
    assert newest.endswith("ckpt-0000003") and older.endswith("ckpt-0000002")
    shard = next(f for f in os.listdir(os.path.join(newest, "dcp")) if f.endswith(".distcp"))
    with open(os.path.join(newest, "dcp", shard), "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=rf"dcp/{shard} is truncated \(100 bytes"):
        train.verify_checkpoint(newest)
    capsys.readouterr()
    train.main(args + ["--stages", "align:4", "--resume"])
    out = capsys.readouterr().out
    assert "skipped damaged checkpoint(s)" in out and "resumed from" in out and "ckpt-0000002 at step 2" in out
    assert len(losses(run)) == 4


def test_nan_loss_stops_the_run_without_saving(tmp_path):
    """A learning rate that blows the weights up: the run stops with an error at the first non-finite loss, and the
    last checkpoint written before it stays the latest."""
    run = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"the loss became (nan|inf) at step (\d+) .* stopped without saving") as e:
        train.main(TINY + ["--stages", "align:1,pretrain:5", "--eval_every", "1", "--eval_samples", "0",
                           "--lr", "1e20", "--warmup", "0", "--out_dir", str(run)])
    logged = [json.loads(line)["step"] for line in open(run / "metrics.jsonl")]
    assert f"at step {logged[-1] + 1} " in str(e.value)
    assert (run / "latest").read_text() == f"ckpt-{logged[-1]:07d}"          # saved before the bad step, kept


def test_an_existing_run_is_not_overwritten(tmp_path):
    run = str(tmp_path / "run")
    train.main(TINY + ["--stages", "align:1", "--eval_every", "0", "--eval_samples", "0", "--out_dir", run])
    before = open(os.path.join(run, "metrics.jsonl")).read()
    with pytest.raises(FileExistsError, match="holds a run; --resume it"):
        train.main(TINY + ["--stages", "align:1", "--out_dir", run])
    assert open(os.path.join(run, "metrics.jsonl")).read() == before


def test_no_test_on_the_toy_world_with_test_samples_0(tmp_path):
    """The toy world has no end: --test_samples 0 runs no test (instead of failing after training), and says so in
    what it writes; the run still ends with its export."""
    out = str(tmp_path / "run")
    args = TINY[:TINY.index("--test_samples")] + TINY[TINY.index("--test_samples") + 2:]
    train.main(args + ["--test_samples", "0", "--eval_samples", "0", "--stages", "sft:2", "--out_dir", out])
    assert not os.path.exists(os.path.join(out, "test_scores.json"))
    assert os.path.isfile(os.path.join(out, "hf", "config.json"))


def test_activation_checkpointing_on_one_device(tmp_path):
    """--activation_checkpointing also works without torchrun: every block is wrapped (it recomputes in the
    backward), the losses equal a run without it, and the export has the plain parameter names."""
    runs = {}
    for ac in (False, True):
        out = str(tmp_path / f"ac{int(ac)}")
        train.main(TINY + ["--stages", "sft:3", "--out_dir", out, "--eval_samples", "0"]
                   + (["--activation_checkpointing"] if ac else []))
        runs[ac] = losses(out)
    torch.testing.assert_close(runs[True], runs[False], rtol=1e-6, atol=0)
    exported = Qwen3VL.from_pretrained(str(tmp_path / "ac1" / "hf"))
    assert not any("checkpoint_wrapped" in k for k in exported.state_dict())


def test_checkpoint_blocks_wraps_every_block():
    cfg = Qwen3VLConfig.from_preset("toy-cpu")
    model = Qwen3VL(cfg)
    train.checkpoint_blocks(model)
    wrapped = [type(b).__name__ for b in [*model.language_model.layers, *model.visual.blocks]]
    assert wrapped == ["CheckpointWrapper"] * (cfg.text.num_hidden_layers + cfg.vision.depth)


def test_model_flops_count_every_matmul_of_a_step():
    """model_flops (the MFU's numerator): the decoder layers' matrix products in a text-only forward + backward equal
    torch's own FLOP count of them (the head is counted once forward and backward, 6 H V a token, whatever the
    chunked loss recomputes), and the attention terms count each document's causal pairs and each frame's pairs."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = Qwen3VLConfig.from_preset("toy-cpu")
    model = Qwen3VL(cfg)
    model.init_weights(seed=0)
    fc = train.flop_counts(model)
    ids = torch.randint(0, 300, (2, 48))
    with FlopCounterMode(display=False) as counter:
        _, loss = model(ids, labels=ids)
        loss.backward()
    layers = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
                 if name.startswith("Qwen3VL.language_model.layers.") and name.count(".") == 3)   # each layer once
    head = 6 * cfg.text.vocab_size * cfg.text.hidden_size * ids.numel()       # the head's, forward and backward
    assert layers == train.model_flops(cfg, fc, ids.numel(), [], []) - head
    t = cfg.text
    width = t.num_attention_heads * t.head_dim * t.num_hidden_layers
    assert train.model_flops(cfg, fc, 0, [3, 5], []) == 12 * width * (6 + 15)          # 3*4/2 + 5*6/2 pairs
    v = cfg.vision
    assert train.model_flops(cfg, fc, 0, [], [16, 4]) == 6 * (fc["patch"] * 20 + fc["merged"] * 5) \
        + 12 * v.hidden_size * v.depth * (256 + 16)
    assert train.frame_sizes({"image_grid_thw": torch.tensor([[1, 4, 4]]), "video_grid_thw": torch.tensor([[2, 2, 4]])}) \
        == [16, 8, 8]
    assert train.document_lengths(torch.tensor([[0, 0, 1, 1, 1, 2]])) == [2, 3, 1]
