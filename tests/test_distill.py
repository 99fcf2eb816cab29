"""distill.py against the math (shared/reference/post_training.md §4, properties of §6 "Distillation losses"): signs
and zeros of the divergences, gradients by autograd against closed forms, the reference values of the appendix,
JSD's bounds, limits and endpoints, temperature (no T^2 factor), top-k with a tail bucket, masking, arguments.
The loop, with a tiny random teacher and a toy-cpu student on the toy world's text questions: off-policy and
on-policy steps lower the held-out KLs, a resumed run repeats the uninterrupted one bitwise, the teacher cache holds
the teacher's top-k at the right positions and trains exactly as the teacher online, bad inputs stop the run before
it writes anything."""
import json
import math
import os
import shutil

import pytest
import torch

import distill
from distill import forward_kl, forward_kl_topk, jsd, reverse_kl, teacher_topk

B, T, V = 2, 4, 7
MASK = torch.tensor([[1.0, 1, 1, 0], [0, 1, 1, 0]])         # N = 5 tokens
N = int(MASK.sum())


def logits(seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(B, T, V, generator=g, dtype=torch.float64)


def student_grad(loss_fn, student, *args, **kw):
    student = student.clone().requires_grad_()
    loss_fn(student, *args, **kw).backward()
    return student.grad


def exact_kl(log_a, log_b):
    """KL(a || b) per position [B, T] from log-probs [B, T, V]."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def masked_mean(x):
    return (x * MASK).sum() / N


def test_kls_nonnegative_and_zero_only_for_equal_distributions():
    """§6 Distillation 1: every divergence is > 0 for different distributions and 0 when the logits differ by a
    per-token constant (the same distribution)."""
    for seed in range(5):
        s, t = logits(seed), logits(seed + 100)
        for loss in [forward_kl, reverse_kl, jsd]:
            assert loss(s, t, MASK) > 1e-3
        shifted = t + torch.randn(B, T, 1, dtype=torch.float64)
        for loss in [forward_kl, reverse_kl, jsd]:
            assert loss(shifted, t, MASK).abs() < 1e-12
        assert forward_kl(shifted, t, MASK, top_k=3).abs() < 1e-12


def test_reference_values():
    """Appendix: P = (.7, .2, .1) teacher, Q = (.4, .4, .2) student: KL(P||Q) = 0.18379, KL(Q||P) = 0.19204,
    JSD(0.5) = 0.04620."""
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64).log().expand(1, 1, 3)
    q = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64).log().expand(1, 1, 3)
    one = torch.ones(1, 1)
    assert forward_kl(q, p, one).item() == pytest.approx(0.18379, abs=1e-5)
    assert reverse_kl(q, p, one).item() == pytest.approx(0.19204, abs=1e-5)
    assert jsd(q, p, one).item() == pytest.approx(0.04620, abs=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_forward_kl_gradient(temperature):
    """§6 Distillation 1 and §4.2: d forward_kl / d student logits = (softmax(s/T) - softmax(t/T)) / (T N) at the N
    masked tokens (no T^2 factor), 0 elsewhere."""
    s, t = logits(0), logits(1)
    expected = (torch.softmax(s / temperature, -1) - torch.softmax(t / temperature, -1)) / (temperature * N)
    torch.testing.assert_close(student_grad(forward_kl, s, t, MASK, temperature), expected * MASK[..., None])


def test_reverse_kl_gradient():
    """§6 Distillation 1: d KL(q || p) / d z_student = q (log q - log p - KL(q || p)), per masked token / N."""
    s, t = logits(2), logits(3)
    log_q, log_p = s.log_softmax(-1), t.log_softmax(-1)
    expected = log_q.exp() * (log_q - log_p - exact_kl(log_q, log_p)[..., None]) / N
    torch.testing.assert_close(student_grad(reverse_kl, s, t, MASK), expected * MASK[..., None])


def test_jsd_bounds_limits_endpoints_symmetry():
    """§6 Distillation 2: JSD(0.5) in [0, log 2] (near log 2 for nearly disjoint distributions); JSD(beta) / beta ->
    KL(p || q) as beta -> 0 and JSD / (1 - beta) -> KL(q || p) as beta -> 1; beta = 0 / 1 are exactly forward_kl /
    reverse_kl; JSD(s, t, beta) = JSD(t, s, 1 - beta)."""
    s, t = logits(4), logits(5)
    for seed in range(5):
        value = jsd(logits(seed, 5.0), logits(seed + 50, 5.0), MASK)
        assert 0 < value < math.log(2)
    apart = torch.full((1, 1, 2), -40.0, dtype=torch.float64)
    a, b = apart.clone(), apart.clone()
    a[..., 0], b[..., 1] = 40.0, 40.0
    assert jsd(a, b, torch.ones(1, 1)).item() == pytest.approx(math.log(2), abs=1e-9)
    forward, reverse = forward_kl(s, t, MASK), reverse_kl(s, t, MASK)
    assert (jsd(s, t, MASK, 1e-6) / 1e-6).item() == pytest.approx(forward.item(), rel=1e-4)
    assert (jsd(s, t, MASK, 1 - 1e-6) / 1e-6).item() == pytest.approx(reverse.item(), rel=1e-4)
    assert jsd(s, t, MASK, 0.0) == forward and jsd(s, t, MASK, 1.0) == reverse
    for beta in [0.1, 0.5, 0.8]:
        torch.testing.assert_close(jsd(s, t, MASK, beta), jsd(t, s, MASK, 1 - beta))


def test_temperature():
    """Both distributions at temperature T, loss not rescaled: each loss at T equals the divergence of
    softmax(logits / T) (so T = 1 is the untempered divergence), and it vanishes as T -> infinity."""
    s, t = logits(6), logits(7)
    for temperature in [1.0, 0.7, 3.0]:
        log_q, log_p = (s / temperature).log_softmax(-1), (t / temperature).log_softmax(-1)
        torch.testing.assert_close(forward_kl(s, t, MASK, temperature), masked_mean(exact_kl(log_p, log_q)))
        torch.testing.assert_close(reverse_kl(s, t, MASK, temperature), masked_mean(exact_kl(log_q, log_p)))
        torch.testing.assert_close(jsd(s, t, MASK, 0.5, temperature), jsd(s / temperature, t / temperature, MASK))
    values = [forward_kl(s, t, MASK, temperature) for temperature in [1.0, 10.0, 1e4]]
    assert values[0] > values[1] > values[2] and values[2] < 1e-6


def test_topk_equals_full_kl_at_k_equal_v():
    """§6 Distillation 4: with k = V (empty tail) the top-k forward KL is the full one, in value and gradient, at
    any temperature."""
    s, t = logits(8), logits(9)
    for temperature in [1.0, 2.0]:
        torch.testing.assert_close(forward_kl(s, t, MASK, temperature, top_k=V), forward_kl(s, t, MASK, temperature))
        torch.testing.assert_close(student_grad(forward_kl, s, t, MASK, temperature, top_k=V),
                                   student_grad(forward_kl, s, t, MASK, temperature))


def test_topk_tail_bucket_is_a_lower_bound():
    """§4.4 / §6 Distillation 4: the (k + 1)-bucket KL lies in [0, full KL] (merging outcomes cannot increase a KL),
    grows with k, and is > 0 already at k = 1 thanks to the tail bucket."""
    s, t = logits(10), logits(11)
    full = forward_kl(s, t, MASK)
    values = [forward_kl(s, t, MASK, top_k=k) for k in range(1, V + 1)]
    assert values[0] > 0
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:])) and values[-2] <= full


def test_topk_gradient_closed_form():
    """d / d z_student = q - p~, p~ = the teacher's p on its top-k ids and its tail mass P_tail spread over the other
    ids in proportion to the student's q (q_v / Q_tail)."""
    s, t, k = logits(12), logits(13), 3
    ids, log_p = teacher_topk(t, k)
    q = s.softmax(-1)
    in_topk = torch.zeros(B, T, V, dtype=torch.bool).scatter(-1, ids, True)
    p_tail = 1 - log_p.exp().sum(-1, keepdim=True)
    q_tail = (q * ~in_topk).sum(-1, keepdim=True)
    p_tilde = torch.zeros(B, T, V, dtype=torch.float64).scatter(-1, ids, log_p.exp()) + ~in_topk * q / q_tail * p_tail
    expected = (q - p_tilde) / N * MASK[..., None]
    torch.testing.assert_close(student_grad(forward_kl, s, t, MASK, top_k=k), expected)


def test_stored_topk_form():
    """teacher_topk keeps the k most likely ids, largest first, with their log-probs at the temperature; the loss
    from the stored form is forward_kl(top_k=k)."""
    s, t = logits(14), logits(15)
    ids, log_p = teacher_topk(t, 4, temperature=2.0)
    full = (t / 2).log_softmax(-1)
    assert ids.shape == log_p.shape == (B, T, 4) and (log_p[..., 1:] <= log_p[..., :-1]).all()
    torch.testing.assert_close(log_p, full.gather(-1, ids))
    assert (full.topk(4, -1).values == log_p).all()
    torch.testing.assert_close(forward_kl_topk(s, ids, log_p, MASK, 2.0), forward_kl(s, t, MASK, 2.0, top_k=4))


def test_masked_tokens_contribute_nothing():
    """§6 Distillation 7: positions with mask 0 may hold anything (even inf / NaN): same losses, zero and finite
    gradient there; an all-zero mask gives 0."""
    s, t = logits(16), logits(17)
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[MASK == 0], t_bad[MASK == 0] = math.nan, math.inf
    cases = [(forward_kl, {}), (forward_kl, {"top_k": 3}), (reverse_kl, {}), (jsd, {}), (jsd, {"beta": 0.3})]
    for loss, kw in cases:
        torch.testing.assert_close(loss(s_bad, t_bad, MASK, **kw), loss(s, t, MASK, **kw))
        g = student_grad(loss, s_bad, t_bad, MASK, **kw)
        assert torch.isfinite(g).all() and (g[MASK == 0] == 0).all()
        assert loss(s, t, torch.zeros(B, T), **kw) == 0


def test_teacher_is_a_fixed_target():
    """Teacher logits are detached: the loss sends no gradient to the teacher."""
    s, t = logits(18).requires_grad_(), logits(19).requires_grad_()
    for loss, kw in [(forward_kl, {}), (forward_kl, {"top_k": 3}), (reverse_kl, {}), (jsd, {})]:
        loss(s, t, MASK, **kw).backward()
        assert s.grad is not None and t.grad is None


def test_argument_checks():
    s, t = logits(20), logits(21)
    with pytest.raises(ValueError, match="top_k must be in \\[1, vocabulary size 7\\], got 8"):
        forward_kl(s, t, MASK, top_k=8)
    with pytest.raises(ValueError, match="top_k must be in \\[1, vocabulary size 7\\], got 0"):
        teacher_topk(t, 0)
    for loss in [forward_kl, reverse_kl, jsd]:
        for temperature in [0.0, -1.0]:
            with pytest.raises(ValueError, match=f"temperature must be > 0, got {temperature}"):
                loss(s, t, MASK, temperature=temperature)
    with pytest.raises(ValueError, match="beta must be in \\[0, 1\\], got 1.5"):
        jsd(s, t, MASK, beta=1.5)


# ----------------------------------------------------------------------------------------------------------
# The loop


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny random teacher (toy-cpu sizes, weights at std 0.1: a peaked distribution to learn) with a BPE trained
    on the toy world's text, saved as a Hugging Face directory."""
    from data.toyworld import ToyWorld
    from model import Qwen3VL, Qwen3VLConfig
    from tokenizer import Tokenizer
    tok = Tokenizer.train(ToyWorld(seed=0).text_corpus(300), 300)
    cfg = Qwen3VLConfig.from_preset("toy-cpu", text=dict(vocab_size=320), image_token_id=tok.image_token_id,
                                    video_token_id=tok.video_token_id, vision_start_token_id=tok.vision_start_id,
                                    vision_end_token_id=tok.vision_end_id)
    teacher = Qwen3VL(cfg)
    teacher.init_weights(seed=5, std=0.1)
    path = tmp_path_factory.mktemp("teacher") / "hf"
    teacher.save_pretrained(path)
    tok.save(str(path / "tokenizer.tiktoken"))
    return str(path)


def loop_args(teacher_dir, out_dir, *extra):
    return ["--teacher", teacher_dir, "--student", "toy-cpu", "--out_dir", str(out_dir), "--steps", "6",
            "--batch_size", "4", "--eval_samples", "4", "--eval_every", "3", "--lr", "3e-3", "--warmup", "1",
            "--max_new_tokens", "6", "--top_k", "16", *extra]


def logged(out_dir, key):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [m[key] for m in map(json.loads, f) if key in m]


def test_off_then_on_policy_steps_lower_the_held_out_kl(teacher_dir, tmp_path, capsys):
    """Off-policy steps lower the forward KL along held-out replies; on-policy steps from that student (--student its
    run folder) lower the reverse KL along its samples to held-out prompts. Only the LLM learns (the ViT and mergers
    leave the on-policy run as they came in); each run writes its progress, metrics, plot, checkpoint and export."""
    from model import Qwen3VL
    off, on = tmp_path / "off", tmp_path / "on"
    distill.main(loop_args(teacher_dir, off))
    kl = logged(off, "eval_kl")
    assert len(kl) == 3 and kl[-1] < 0.7 * kl[0], kl
    assert "step     1/6 | off | loss" in capsys.readouterr().out
    distill.main(loop_args(teacher_dir, on, "--phase", "on", "--lr", "1e-3") + ["--student", str(off)])
    rkl = logged(on, "eval_rkl")
    assert logged(on, "batch") == ["on"] * 6 and rkl[-1] < 0.9 * rkl[0], rkl
    for name in ("loss.png", "metrics.jsonl", "latest", "hf/config.json"):
        assert os.path.exists(on / name), name
    before, after = Qwen3VL.from_pretrained(off / "hf").state_dict(), Qwen3VL.from_pretrained(on / "hf").state_dict()
    assert all(torch.equal(before[n], after[n]) == n.startswith("visual.") for n in before)


def test_resume_repeats_the_uninterrupted_run(teacher_dir, tmp_path):
    """A run stopped after its checkpoint at step 2 and resumed: bitwise the same losses (off- and on-policy
    batches, --lambda_off 0.5) and held-out KLs as the run that was not stopped."""
    args = loop_args(teacher_dir, tmp_path, "--phase", "on", "--lambda_off", "0.5", "--steps", "4", "--eval_every",
                     "2", "--seed", "2")
    distill.main(args)
    losses, kls = logged(tmp_path, "loss"), logged(tmp_path, "eval_rkl")
    assert logged(tmp_path, "batch") == ["off", "on", "off", "on"]
    shutil.rmtree(tmp_path / "ckpt-0000004")                 # as if stopped after step 2's checkpoint
    shutil.rmtree(tmp_path / "hf")
    (tmp_path / "latest").write_text("ckpt-0000002")
    distill.main(args + ["--resume"])
    assert logged(tmp_path, "loss") == losses and logged(tmp_path, "eval_rkl") == kls


def test_teacher_cache_round_trips(teacher_dir, tmp_path, monkeypatch):
    """The cache holds each reply's tokens and the teacher's top-k at the position that predicts each (checked
    against a forward pass over the chat template's encoding); a run from it never loads the teacher's weights and
    trains bitwise as the teacher online. With --teacher_answers the replies are the teacher's greedy ones."""
    from data.toy import ToyData
    from sample import generate, load
    cache = str(tmp_path / "top16.safetensors")
    args = ["--steps", "2", "--eval_every", "0"]
    distill.main(loop_args(teacher_dir, tmp_path / "online", *args))
    distill.main(loop_args(teacher_dir, tmp_path / "write", *args, "--teacher_cache", cache))
    monkeypatch.setattr(distill, "load_model", lambda *a, **k: pytest.fail("the teacher's weights were loaded"))
    distill.main(loop_args(teacher_dir, tmp_path / "read", *args, "--teacher_cache", cache))
    online = logged(tmp_path / "online", "loss")
    assert logged(tmp_path / "write", "loss") == online == logged(tmp_path / "read", "loss")
    assert logged(tmp_path / "read", "eval_kl") == logged(tmp_path / "online", "eval_kl")
    monkeypatch.undo()

    teacher, tok, processor = load(teacher_dir)
    settings = distill.cache_settings(distill.parse_args(loop_args(teacher_dir, tmp_path)), teacher_dir, tok)
    outputs = distill.load_cache(cache, settings)
    assert sorted(outputs["train"].rows) == list(range(8)) and sorted(outputs["eval"].rows) == list(range(4))
    sample = ToyData(seed=0).sample(5, distill.TEXT_STAGE)
    batch = processor([sample["messages"]])
    targets = batch["labels"][0, 1:] != -100                             # position t predicts token t + 1
    logits = teacher(batch["input_ids"], batch["attention_mask"])[0][0, :-1][targets]
    ids, logprobs = teacher_topk(logits, 16)
    prompt, reply, stored_ids, stored_logprobs = outputs["train"].rows[5]
    assert torch.equal(torch.cat([prompt, reply]), batch["input_ids"][0, :len(prompt) + len(reply)])
    assert torch.equal(reply, batch["labels"][0][batch["labels"][0] != -100])
    assert torch.equal(stored_ids, ids) and torch.allclose(stored_logprobs, logprobs, atol=1e-5)

    answers = str(tmp_path / "answers.safetensors")
    distill.main(loop_args(teacher_dir, tmp_path / "answers", *args, "--teacher_answers", "--teacher_cache", answers))
    prompt, reply, _, _ = distill.load_cache(answers, {"teacher_answers": True})["train"].rows[5]
    greedy = generate(teacher, prompt[None], max_new_tokens=6, temperature=0.0, eos_ids=distill.stop_ids(tok))[0]
    assert torch.equal(reply, greedy[:len(reply)]) and (len(reply) == 6 or reply[-1] in distill.stop_ids(tok))


def test_tokenizers_must_match():
    """Teacher and student must share the BPE, the special-token ids and the number of logits."""
    from model import Qwen3VLConfig
    from tokenizer import Tokenizer
    tok = Tokenizer.train(["a tiny corpus of words"] * 20, 300)
    other = Tokenizer.train(["another corpus, other merges"] * 20, 300)
    swapped = {t: i for t, i in tok.special.items()}
    swapped["<|im_start|>"], swapped["<|im_end|>"] = tok.im_end_id, tok.im_start_id
    shuffled = Tokenizer(tok.ranks, swapped)
    cfg = Qwen3VLConfig.from_preset("toy-cpu", text=dict(vocab_size=320))
    visual = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    wider = Qwen3VLConfig.from_preset("toy-cpu", text=dict(vocab_size=384), **{k: getattr(cfg, k) for k in visual})
    distill.check_shared_vocabulary(("t", tok, cfg), ("s", Tokenizer(tok.ranks), cfg))
    for student, problem in [((other, cfg), "their BPE vocabularies differ"),
                             ((shuffled, cfg), f"their special-token ids differ: <\\|im_end\\|> {tok.im_end_id} vs "
                                               f"{tok.im_start_id}, <\\|im_start\\|> {tok.im_start_id} vs "
                                               f"{tok.im_end_id}"),
                             ((tok, wider), "their models have 320 and 384 logits")]:
        with pytest.raises(ValueError, match=f"the teacher 'T' \\({tok.n_vocab} tokens, 320 logits.*and the student "
                                             f"'S' .* do not share a tokenizer: {problem}"):
            distill.check_shared_vocabulary(("T", tok, cfg), ("S", *student))


def test_steps_0_only_measures_and_exports_a_new_student(teacher_dir, tmp_path):
    """--steps 0 with --student_arch: a preset student with 2 LLM layers, only its held-out KL at step 0 and its
    export; that export as --student, measured again with --steps 0, has the same KL."""
    from model import Qwen3VL
    made, again = tmp_path / "made", tmp_path / "again"
    distill.main(loop_args(teacher_dir, made, "--steps", "0", "--student_arch", "text.num_hidden_layers=2"))
    kl = logged(made, "eval_kl")
    assert len(kl) == 1 and kl[0] > 0.1 and logged(made, "loss") == []
    assert Qwen3VL.from_pretrained(made / "hf").cfg.text.num_hidden_layers == 2
    distill.main(loop_args(teacher_dir, again, "--steps", "0") + ["--student", str(made / "hf")])
    assert logged(again, "eval_kl") == pytest.approx(kl, rel=1e-5)


def test_eval_scores_only_the_named_tasks(teacher_dir):
    import eval
    results = eval.main(["--init_from", teacher_dir, "--data", "toy", "--tasks", "lookup,text", "--samples", "2",
                         "--max_new_tokens", "4", "--device", "cpu"])
    assert set(results) == {"lookup", "text"} and all(r["n"] == 2 for r in results.values())


def test_bad_inputs_stop_before_the_first_step(teacher_dir, tmp_path):
    """A student with another tokenizer, a teacher cache that does not match the data rows or the settings, top_k
    larger than the vocabulary, a temperature <= 0: a clear error, and no out_dir written."""
    from model import Qwen3VL, Qwen3VLConfig
    from tokenizer import Tokenizer
    out = tmp_path / "out"
    tok = Tokenizer.train(["another corpus, other merges"] * 20, 300)
    student = tmp_path / "student"
    cfg = Qwen3VLConfig.from_preset("toy-cpu", text=dict(vocab_size=320))
    Qwen3VL(cfg).save_pretrained(student)
    tok.save(str(student / "tokenizer.tiktoken"))
    cache = str(tmp_path / "cache.safetensors")
    distill.main(loop_args(teacher_dir, tmp_path / "made", "--steps", "2", "--teacher_cache", cache))
    cases = [
        (["--student", str(student)], f"the teacher '{teacher_dir}' .* and the student '{student}' .* do not share a "
                                      "tokenizer: their BPE vocabularies differ"),
        (["--steps", "3", "--teacher_cache", cache], f"--teacher_cache {cache}: no teacher outputs for sample 8 "
                                                     r"\(toy world train #8\); it holds 8 samples, numbers 0-7"),
        (["--steps", "2", "--seed", "1", "--teacher_cache", cache], f"--teacher_cache {cache}: sample 0 "
                                                                    r"\(toy world train #0\) does not match the data"),
        (["--steps", "2", "--top_k", "8", "--teacher_cache", cache], "made with top_k = 16, this run has 8"),
        (["--top_k", "321"], r"--top_k 321: more than the vocabulary \(320 logits\)"),
        (["--student", str(student), "--student_arch", "text.num_hidden_layers=2"],
         "--student_arch text.num_hidden_layers=2: builds a new student from a preset"),
        (["--student_arch", "text.layers=2"], "unknown key 'text.layers'"),
        (["--temperature", "0"], "--temperature=0.0: must be a finite number > 0"),
        (["--temperature", "-1"], "--temperature=-1.0: must be a finite number > 0"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            distill.main(loop_args(teacher_dir, out) + extra)
        assert not out.exists()


def test_a_reply_ends_at_a_stop_and_its_last_token_is_only_a_target(monkeypatch):
    """A sampled reply ends at its first EOS or visual placeholder (without pixels a placeholder is no valid input);
    the rows hold the prompt and every reply token but the last, and the mask marks the positions predicting the
    reply."""
    from argparse import Namespace
    from contextlib import nullcontext
    from tokenizer import Tokenizer
    tok = Tokenizer.train(["a tiny corpus of words"] * 20, 300)
    pad, img = tok.pad_id, tok.image_token_id
    sampled = torch.tensor([[5, img, 7, 8], [5, 6, tok.im_end_id, pad], [5, 6, 7, 8]])
    monkeypatch.setattr(distill, "generate", lambda *a, **k: sampled)
    prompts = dict(input_ids=torch.tensor([[pad, 1, 2], [1, 2, 3], [pad, pad, 4]]),
                   attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]]))
    run = Namespace(autocast=nullcontext(), device=torch.device("cpu"))
    replies = distill.sampled_replies(None, prompts, tok, Namespace(max_new_tokens=4), run, 1.0)
    assert [r.tolist() for r in replies] == [[5, img], [5, 6, tok.im_end_id], [5, 6, 7, 8]]
    inputs, mask = distill.join(prompts, replies, pad)
    assert inputs["input_ids"].tolist() == [[pad, pad, 1, 2, 5], [1, 2, 3, 5, 6], [pad, 4, 5, 6, 7]]
    assert inputs["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert mask.int().tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]]
