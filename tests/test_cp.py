"""
train.py --cp: context parallelism with torch's own implementation. Two CPU ranks (gloo) splitting one packed row
(several documents, images) give the loss and gradients of one process; train.py --cp 2 under torchrun trains as
one process does; --cp's conditions are refused by name.

On the CPU two guards are lifted in the ranks, neither of which changes a number: torch refuses FlexAttention's
backward on the CPU (its eager implementation differentiates exactly: conftest.flex_backward_on_cpu), and torch's
context-parallel block mask is built by torch.compile, which on the CPU would compile C++ for a minute; the eager
builder computes the same mask.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train
from data.toy import ToyData
from data.toyworld import ToyWorld
from model import Qwen3VL, Qwen3VLConfig
from processor import Processor
from tokenizer import Tokenizer

SEQ_LEN = 256                                      # a multiple of 128 x cp
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lift_cpu_guards():
    import torch.distributed.tensor.experimental._context_parallel._attention as cp_attention
    import torch.nn.attention.flex_attention as fa
    fa._validate_device = lambda *tensors: None
    cp_attention._compiled_create_block_mask = fa.create_block_mask


def _loss_and_grads(model, batch, norm, context_parallel=None, world_size=1):
    """One micro-step as train.train takes it: the summed loss over the global target count, backward."""
    b = dict(batch)
    labels = b.pop("labels")
    b.pop("real")
    _, loss = model(**b, labels=labels, loss_reduction="sum", return_hidden=True, run_vision=world_size > 1,
                    context_parallel=context_parallel)
    loss = loss / norm
    (loss * world_size).backward()                 # FSDP averages gradients over ranks: undo it
    return loss.detach()


def _rank(rank, port, cfg, state, batch, norm, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    _lift_cpu_guards()
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (2,))                                           # FSDP over both ranks, as Run
    cp_mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "cp"))["cp"]  # one row shared by both
    with torch.device("meta"):
        model = Qwen3VL(cfg)
    train.shard(model, mesh)
    context_parallel = train.ContextParallel(model, cp_mesh)
    model.to_empty(device="cpu")
    train.fill(model, state.items())
    loss = _loss_and_grads(model, batch, norm, context_parallel, world_size=2)
    positions = context_parallel.positions(SEQ_LEN)
    dist.all_reduce(loss)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(dict(loss=loss, grads=grads), out)
    torch.save(positions, f"{out}.positions{rank}")
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def packed():
    """A tiny toy-cpu model and one packed row of SEQ_LEN tokens holding several samples with images."""
    world = ToyWorld(seed=0, image_size=96)
    tok = Tokenizer.train(world.text_corpus(1000), 400)
    cfg = Qwen3VLConfig.from_preset("toy-cpu", text=dict(vocab_size=448), image_token_id=tok.image_token_id,
                                    video_token_id=tok.video_token_id, vision_start_token_id=tok.vision_start_id,
                                    vision_end_token_id=tok.vision_end_id)
    torch.manual_seed(0)
    model = Qwen3VL(cfg)
    model.init_weights(seed=1)
    processor = Processor(tok, min_pixels=64 * 64 // 2, max_pixels=64 * 64 * 4)
    packer = train.Packer(ToyData(seed=0), processor, cfg)
    batch = {k: v for k, v in packer.batch([0], "pretrain", SEQ_LEN).items() if v is not None}
    return cfg, model, batch


def test_two_cp_ranks_equal_one_process(packed, tmp_path):
    """--cp 2 on 2 ranks (FSDP2 x CP over gloo): each rank computes the queries of half the row (head-tail: chunks
    0 and 3 of 4, and 1 and 2), keys and values gathered; the summed loss and every gradient (the ViT's, the
    embeddings', each layer's) equal one process's on the whole row under the dense SDPA mask."""
    cfg, model, batch = packed
    docs = batch["document_ids"][0][batch["real"][0].bool()].unique()
    assert len(docs) >= 3 and batch["pixel_values"] is not None          # packed documents, with images
    norm = float(train.target_weight(batch))
    loss_one = _loss_and_grads(model, batch, norm)
    grads_one = {n: p.grad for n, p in model.named_parameters()}
    out = str(tmp_path / "cp.pt")
    state = {n: p.detach() for n, p in model.named_parameters()}
    mp.spawn(_rank, args=(_free_port(), cfg, state, batch, norm, out), nprocs=2)
    two = torch.load(out)
    p0, p1 = torch.load(f"{out}.positions0"), torch.load(f"{out}.positions1")
    quarter = torch.arange(SEQ_LEN // 4)
    assert torch.equal(p0, torch.cat([quarter, quarter + 3 * SEQ_LEN // 4]))
    assert torch.equal(p1, torch.cat([quarter + SEQ_LEN // 4, quarter + SEQ_LEN // 2]))
    torch.testing.assert_close(two["loss"], loss_one, rtol=1e-6, atol=0)
    assert two["grads"].keys() == grads_one.keys()
    for n, g in grads_one.items():
        assert g is not None and g.abs().max() > 0, n
        assert (two["grads"][n] - g).abs().max() <= 1e-5 * g.abs().max(), n


def test_train_with_cp_equals_one_process(tmp_path):
    """train.py --cp 2 under torchrun (2 CPU ranks, the guards above lifted and --cp's CUDA check passed) trains on
    the rows of one process with --cp 1: the same losses, step by step, and the same weights after the updates."""
    args = ["--vocab_size", "400", "--batch_size", "1", "--seq_len", str(SEQ_LEN), "--stages", "pretrain:3",
            "--lr", "1e-5", "--warmup", "1", "--eval_samples", "0", "--test_samples", "1", "--max_new_tokens", "2",
            "--seed", "3"]
    script = tmp_path / "train_cp_on_cpu.py"
    script.write_text(f"import sys, torch\nsys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'tests')!r}]\n"
                      "from test_cp import _lift_cpu_guards\n_lift_cpu_guards()\nimport train\n"
                      "check = train.check_cp\n"
                      "train.check_cp = lambda cp, n, device: check(cp, n, torch.device('cuda'))\n"
                      "train.main(sys.argv[1:])\n")
    two = tmp_path / "two"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), *args,
                    "--cp", "2", "--out_dir", str(two)], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                   check=True, capture_output=True)
    train.main(args + ["--out_dir", str(tmp_path / "one")])
    a, b = (_losses(d) for d in (two, tmp_path / "one"))
    assert len(a) == len(b) == 3
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6
    m2, m1 = (Qwen3VL.from_pretrained(str(d / "hf")) for d in (two, tmp_path / "one"))
    for (name, p), q in zip(m2.state_dict().items(), m1.state_dict().values()):
        assert (p - q).abs().max() <= 1e-6, name


def _losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [m["loss"] for m in map(json.loads, f) if "loss" in m]


def test_cp_settings_are_checked(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--cp", "2", "--seq_len", "200"])
    assert "--seq_len 200: with --cp 2 must be a multiple of 128 x 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--cp", "0"])
    assert "--cp 0: must be >= 1" in capsys.readouterr().err
    assert train.parse_args(["--cp", "2", "--seq_len", "512"]).cp == 2
    assert train.parse_args(["--seq_len", "200"]).cp == 1                    # any length without --cp
    with pytest.raises(ValueError, match=r"--cp 2: must divide the number of ranks, 3"):
        train.check_cp(2, 3, torch.device("cuda"))
    with pytest.raises(ValueError, match=r"--cp 2: .*FlexAttention, whose backward .* only on CUDA, not cpu"):
        train.check_cp(2, 4, torch.device("cpu"))
    train.check_cp(2, 4, torch.device("cuda"))
    train.check_cp(1, 1, torch.device("cpu"))
