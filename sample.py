"""
Generation with Qwen3-VL: prefill the prompt (text, images, videos) into a preallocated KV cache, then decode one
token per row per step. `generate` serves the command line below, evaluation, and the rollouts of RL (SAPO) and
on-policy distillation.

Notable features
- Prefill (reference §3.6): the only call that sees pixels, so visual features and DeepStack enter here; it computes
  the 3-D positions of the prompt and its rope_deltas. Decode steps continue every axis from that offset
  (position = past + k + rope_delta), with no pixels.
- Batches are left-padded; each row stops at its first EOS (<|im_end|>, <|endoftext|> by default) and emits pad
  after it, while the other rows go on. The loop ends when every row has stopped.
- The next token of each row, in this order (vLLM's; the first as transformers' RepetitionPenaltyLogitsProcessor):
    1. repetition penalty r: every id that occurs in the row's prompt (its real tokens) or output so far gets
       logit l / r if l >= 0, else l * r (r > 1 discourages; 1 is off);
    2. presence penalty p (OpenAI / vLLM): every id that occurs in the row's output so far gets l - p (0 is off);
    3. temperature 0: argmax (greedy). Otherwise l / temperature, keep the top_k largest (exactly k; 0: all),
       keep the smallest set of most likely tokens whose probability reaches top_p (a token is dropped when the
       tokens ranked above it already hold top_p), and sample from the softmax with a seeded torch.Generator.
  The defaults sample from the model's own distribution (temperature 1, nothing truncated or penalised), which is
  what RL wants; `INSTRUCT` holds Qwen3-VL's recommended settings for chat (the command line's defaults).
- Log-probs (return_logprobs=True): log softmax of the model's raw logits at each sampled token, i.e. under the
  unmodified distribution at temperature 1 -- exactly what a fresh forward pass over prompt + output gives, and so
  what an RL trainer recomputes for the policy. It is the probability the token was sampled with only when sampling
  with the defaults; with temperature, top-k/top-p or penalties the sampler's distribution differs from the model's.
- Static decode (cuda_graph=True, GPU): a decode step has the same shapes every time (one token per row; attention
  over the whole cache with a mask; the write position is a tensor: model.KVCache), so it is compiled once
  (torch.compile fuses the norms, RoPE and SwiGLU into a few kernels) and captured in a CUDA graph; each token then
  costs one graph launch. The eager path runs the very same step and stays the readable one. The command line's
  --compile also calls model.fuse_projections(): q/k/v and gate/up are each read as one matrix, which a decode step
  (bound by reading the weights) does faster; the values and the state dict stay the same.

Command line (streams the answer; --ground draws the boxes/points of a grounding answer onto the first image):
    python sample.py --init_from path/to/Qwen3-VL-2B-Instruct --image a.png --prompt "Describe this image."
    python sample.py --init_from out/ckpt --video v.mp4 --prompt "What happens?" --temperature 0
    python sample.py --init_from ... --image a.png --prompt 'Locate every cup, output bbox_2d in JSON.' --ground
Its numbers, files and device are checked before the model is loaded; a mistake prints one line, not a traceback.
"""
import argparse
import functools
import os
import sys
import time

import torch

from checks import check_number
from model import KVCache, Qwen3VL

EOS_IDS = (151645, 151643)        # <|im_end|>, <|endoftext|> (Qwen3-VL's generation_config.json)
PAD_ID = 151643                   # <|endoftext|>: what the processor pads with and finished rows emit
INSTRUCT = dict(temperature=0.7, top_k=20, top_p=0.8, presence_penalty=1.5, repetition_penalty=1.0)
CACHE_BLOCK = 256                 # with cuda_graph, cache lengths are rounded up to this: fewer shapes to compile
GREEDY_BELOW = 1e-5               # a temperature below this is greedy (as in vLLM): logits / it can overflow float32


# ----------------------------------------------------------------------------------------------------------
# One decode step: the same function runs eagerly, or compiled and captured in a CUDA graph


def decode_step(model, cache, tokens, attention_mask):
    """tokens [B, 1] at slot cache.pos -> next-token logits [B, V] float32; writes their keys, advances cache.pos."""
    logits, _ = model(tokens, attention_mask=attention_mask, kv_cache=cache)          # [B, 1, V]
    return logits[:, -1].float()


@functools.cache
def compiled_decode_step():
    """decode_step compiled, once per shape (batch, cache length) at its first call. Made on first use: importing
    the compiler takes seconds. Past torch._dynamo.config.recompile_limit (8) shapes, new ones run uncompiled."""
    return torch.compile(decode_step, fullgraph=True, dynamic=False)


class CUDAGraphStep:
    """
    decode_step for one cache, compiled and captured in a CUDA graph. The graph reads its tokens from a fixed
    buffer and the cache's own tensors (their addresses are baked in), so a call copies the tokens in and replays.
    """

    def __init__(self, model, cache, attention_mask):
        self.tokens = torch.zeros(cache.k[0].shape[0], 1, dtype=torch.long, device=cache.pos.device)  # [B, 1]
        pos = cache.pos.clone()
        side = torch.cuda.Stream()                  # compile and warm up off the default stream, as capture needs
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                compiled_decode_step()(model, cache, self.tokens, attention_mask)
                cache.pos.copy_(pos)                # the slot written is rewritten by the first real step
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):          # records the kernels, runs nothing
            self.logits = compiled_decode_step()(model, cache, self.tokens, attention_mask)             # [B, V]

    def __call__(self, tokens):
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits


# ----------------------------------------------------------------------------------------------------------
# Choosing the next token


def apply_penalties(logits, in_prompt, in_output, repetition_penalty=1.0, presence_penalty=0.0):
    """logits [B, V] float32; in_prompt, in_output [B, V] bool: the ids in each row's prompt / output so far."""
    seen = in_prompt | in_output
    logits = torch.where(seen, torch.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty),
                         logits)
    return logits - presence_penalty * in_output


def warp(logits, temperature=1.0, top_k=0, top_p=1.0):
    """logits [B, V] float32 -> those of the sampling distribution: / temperature, -inf outside top-k and top-p."""
    logits = logits / temperature
    if top_k == 0 and top_p == 1:
        return logits
    ranked, order = logits.topk(min(top_k or logits.shape[-1], logits.shape[-1]))    # [B, k], largest first
    if top_p < 1:
        probs = ranked.softmax(-1)
        ranked = ranked.masked_fill(probs.cumsum(-1) - probs >= top_p, -torch.inf)   # the ones above hold top_p
    return torch.full_like(logits, -torch.inf).scatter(1, order, ranked)


def choose(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """The next token of each row [B] from logits [B, V] float32: argmax at temperature 0 (below GREEDY_BELOW),
    else a sample."""
    if temperature < GREEDY_BELOW:
        return logits.argmax(-1)
    probs = warp(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ----------------------------------------------------------------------------------------------------------
# Generation


def check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, presence_penalty, prefix=""):
    """
    generate's numbers, also the command line's (prefix '--'): TypeError / ValueError '<argument>=<value>: must be
    <what is allowed>'. The penalties are bounded so that penalised float32 logits stay finite.
    """
    check_number(f"{prefix}max_new_tokens", max_new_tokens, 1, integer=True)
    check_number(f"{prefix}temperature", temperature, 0)
    check_number(f"{prefix}top_k", top_k, 0, integer=True)
    check_number(f"{prefix}top_p", top_p, 0, 1, low_open=True)
    check_number(f"{prefix}repetition_penalty", repetition_penalty, 1e-3, 1e3)
    check_number(f"{prefix}presence_penalty", presence_penalty, -1e6, 1e6)


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
             pixel_values_videos=None, video_grid_thw=None, video_second_per_grid=None, *, max_new_tokens=64, temperature=1.0, top_k=0,
             top_p=1.0, repetition_penalty=1.0, presence_penalty=0.0, eos_ids=EOS_IDS, pad_id=PAD_ID,
             generator=None, return_logprobs=False, cuda_graph=False, on_token=None, check_finite=True):
    """
    input_ids [B, S] left-padded, attention_mask [B, S] (None: no padding), pixels and grids as for Qwen3VL.forward.
    Sampling as in the module docstring; generator: a torch.Generator on the model's device (None: the global one).
    eos_ids: ids that end a row (kept in its output; pad_id follows). on_token: called with each step's tokens [B].
    cuda_graph: decode with a compiled step captured in a CUDA graph (CUDA only). check_finite: see Qwen3VL.forward.
    Returns tokens [B, max_new_tokens] long; with return_logprobs, (tokens, logprobs [B, max_new_tokens] float32),
    the log-probs of the raw model distribution, 0 after a row's EOS.
    Every argument is checked before any work (TypeError / ValueError naming it): the numbers (check_sampling);
    eos_ids in [0, vocab_size), pad_id an int64; the inputs' shapes (Qwen3VL.check_inputs); prompt + max_new_tokens
    within the context. The prefill then checks the inputs' values (ids in range, grids, finite pixels); the
    decode steps check nothing that would read the device.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, presence_penalty)
    vocab = model.cfg.text.vocab_size
    if isinstance(eos_ids, (str, bytes)) or not hasattr(eos_ids, "__iter__"):
        raise TypeError(f"eos_ids={eos_ids!r}: must be a list of token ids")
    eos_ids = list(eos_ids)
    for i, eos in enumerate(eos_ids):
        check_number(f"eos_ids[{i}]", eos, 0, vocab - 1, integer=True)
    check_number("pad_id", pad_id, -2**63, 2**63 - 1, integer=True)     # any int64: it is only written, never read
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator={generator!r}: must be a torch.Generator or None")
    if on_token is not None and not callable(on_token):
        raise TypeError(f"on_token={on_token!r}: must be callable or None")
    model.check_inputs(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                       check_values=False, video_second_per_grid=video_second_per_grid)
    # (shapes now; the prefill checks the values)
    B, S = input_ids.shape
    device = input_ids.device
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator on {generator.device}: must be on the device of input_ids ({device})")
    if cuda_graph and device.type != "cuda":
        raise ValueError("cuda_graph=True needs the model and inputs on a CUDA device")
    context = model.cfg.text.context_length
    if S + max_new_tokens > context:
        raise ValueError(f"the prompt ({S} tokens) plus max_new_tokens ({max_new_tokens}) is longer than the "
                         f"context ({context}: max_position_embeddings, or a RoPE scaling's extended length)")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    T = S + max_new_tokens
    if cuda_graph:                          # a few cache lengths, so that rollouts of any length reuse compiled steps
        T = min(-(-T // CACHE_BLOCK) * CACHE_BLOCK, context)
    cache = KVCache(model.cfg.text, B, T, device=device, dtype=model.lm_head.weight.dtype)
    mask = torch.cat([attention_mask, attention_mask.new_ones(B, T - S)], dim=1)   # [B, T]: generated tokens are real

    # prefill: a prompt without padding runs causal attention with no mask (the flash kernels); only the last
    # position's logits are made (left padding: it is real in every row)
    hidden, _ = model(input_ids, attention_mask=None if bool(attention_mask.all()) else attention_mask,
                      pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                      pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                      video_second_per_grid=video_second_per_grid, kv_cache=cache, check_finite=check_finite,
                      return_hidden=True)                                           # [B, S, H]
    logits = model.lm_head(hidden[:, -1]).float()                                   # [B, V]
    step = functools.partial(decode_step, model, cache, attention_mask=mask)
    if cuda_graph and max_new_tokens > 1:
        step = CUDAGraphStep(model, cache, mask)
    penalize = repetition_penalty != 1.0 or presence_penalty != 0.0
    if penalize:
        in_prompt = torch.zeros_like(logits).scatter_add_(1, input_ids, attention_mask.float()) > 0   # [B, V]
        in_output = torch.zeros_like(in_prompt)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, max_new_tokens, device=device) if return_logprobs else None
    done = torch.zeros(B, dtype=torch.bool, device=device)

    for t in range(max_new_tokens):
        if t > 0:
            logits = step(choice[:, None])              # [B, V]; finished rows compute on, unread
        scores = apply_penalties(logits, in_prompt, in_output, repetition_penalty, presence_penalty) \
            if penalize else logits
        choice = choose(scores, temperature, top_k, top_p, generator)                      # [B]
        token = choice.masked_fill(done, pad_id)                                          # [B]
        out[:, t] = token
        if return_logprobs:
            logprobs[:, t] = logits.log_softmax(-1).gather(1, choice[:, None])[:, 0].masked_fill(done, 0)
        if penalize:
            in_output.scatter_(1, choice[:, None], True)
        done |= torch.isin(token, eos)
        if on_token is not None:
            on_token(token)
        if done.all():                                                               # the one sync of a step
            break
    return (out, logprobs) if return_logprobs else out


# ----------------------------------------------------------------------------------------------------------
# Command line


def load(path, device="cpu", dtype=None):
    """(model, tokenizer, processor) from a Hugging Face Qwen3-VL directory, a train.py checkpoint or a train.py
    output directory (its latest good checkpoint)."""
    path, tok, processor = load_processor(path)
    return load_model(path, device, dtype), tok, processor


def load_processor(path):
    """
    (checkpoint directory, tokenizer, processor) of what `load` takes, with the image pixel budgets the model was
    trained with (Processor.from_pretrained; the Processor bounds them) and the video_time of its config.json. Reads no
    weights. FileNotFoundError without the directory; ValueError / TypeError naming the file for bad budgets.
    """
    from config import read_hf_config
    from processor import Processor
    from tokenizer import Tokenizer
    from train import checkpoint_dir
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--init_from {path!r}: no such checkpoint directory (expected config.json, "
                                "safetensors and the tokenizer files)")
    path = checkpoint_dir(path) or path                # one of train.py's checkpoints (or its run's folder)
    tok = Tokenizer.from_pretrained(path)
    # videos are written as the model's config says (its video_time switch); a directory without one: the paper's way
    has_config = os.path.isfile(os.path.join(path, "config.json"))
    video_time = read_hf_config(path).video_time if has_config else "timestamps"
    try:
        return path, tok, Processor.from_pretrained(path, tok, video_time=video_time)
    except (TypeError, ValueError) as e:                  # the same error, saying which file it comes from
        raise type(e)(f"{os.path.join(path, 'preprocessor_config.json')!r}: {e}") from e


def load_model(path, device="cpu", dtype=None):
    """The model of a checkpoint directory (as load_processor returns it): train.py's or a Hugging Face one."""
    from train import checkpoint_dir, load_trained
    if checkpoint_dir(path):
        return load_trained(path, device, dtype).eval()
    return Qwen3VL.from_pretrained(path, device=device, dtype=dtype).eval()


class TextStream:
    """Prints a row's text as its tokens arrive; holds back a cut UTF-8 character (U+FFFD) until it completes."""

    def __init__(self, tok):
        self.tok, self.ids, self.printed = tok, [], 0

    def text(self):      # ids past the tokenizer's vocabulary (rows the model's vocab is padded with) have no text
        return self.tok.decode([i for i in self.ids if i < self.tok.n_vocab], skip_special_tokens=True)

    def __call__(self, token):
        self.ids.append(int(token[0]))
        text = self.text()
        if not text.endswith("\ufffd"):
            print(text[self.printed:], end="", flush=True)
            self.printed = len(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Chat with a Qwen3-VL checkpoint about images and videos.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # model
    p.add_argument("--init_from", required=True, help="Hugging Face Qwen3-VL directory, a train.py checkpoint or a "
                   "train.py output directory (its latest)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the model runs")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--compile", action="store_true", help="decode with a compiled step in a CUDA graph, q/k/v and "
                   "gate/up fused (GPU)")
    # prompt
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    p.add_argument("--video", action="append", default=[], help="a video file (repeatable)")
    p.add_argument("--system", default=None, help="an optional system message")
    # sampling (defaults: Qwen3-VL Instruct's recommended settings; --temperature 0 is greedy)
    p.add_argument("--max_new_tokens", type=int, default=1024, help="longest reply")
    p.add_argument("--temperature", type=float, default=INSTRUCT["temperature"], help="0: greedy")
    p.add_argument("--top_k", type=int, default=INSTRUCT["top_k"], help="0: off")
    p.add_argument("--top_p", type=float, default=INSTRUCT["top_p"], help="nucleus mass, in (0, 1]")
    p.add_argument("--presence_penalty", type=float, default=INSTRUCT["presence_penalty"],
                   help="subtracted from the logits of tokens already written")
    p.add_argument("--repetition_penalty", type=float, default=INSTRUCT["repetition_penalty"],
                   help="divides the logits of tokens already seen")
    p.add_argument("--seed", type=int, default=1337, help="of the sampling generator")
    # output
    p.add_argument("--ground", nargs="?", const="", default=None, metavar="PNG",
                   help="draw the answer's bbox_2d / point_2d onto the first image; save as PNG "
                        "(default: <image>_ground.png)")
    return p.parse_args(argv)


def check_args(args):
    """
    The command line's numbers, files and device, before anything is loaded: ValueError / FileNotFoundError naming
    the flag. Returns the torch.device. (The checkpoint directory is checked by load_processor, which comes next.)
    """
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty,
                   args.presence_penalty, prefix="--")
    check_number("--seed", args.seed, 0, 2**64 - 1, integer=True)
    for flag, paths in (("--image", args.image), ("--video", args.video)):
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{flag} {path!r}: no such file")
    if args.ground is not None and not args.image:
        raise ValueError("--ground draws onto an image: give --image")
    if args.ground and not os.path.isdir(os.path.dirname(os.path.abspath(args.ground))):
        raise FileNotFoundError(f"--ground {args.ground!r}: no such directory")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device!r}: no CUDA device is available (use --device cpu)")
    if args.compile and device.type != "cuda":
        raise ValueError("--compile decodes with a CUDA graph: it needs --device cuda")
    return device


def main(argv=None):
    """The command line. Mistakes in the arguments, files or checkpoint raise FileNotFoundError / ValueError /
    TypeError, every one that can be seen without the model before the model is loaded; run as a script, each
    prints as one line."""
    args = parse_args(argv)
    device = check_args(args)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    checkpoint, tok, processor = load_processor(args.init_from)
    content = [{"type": "image", "image": f} for f in args.image] + [{"type": "video", "video": f} for f in args.video]
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": content + [{"type": "text", "text": args.prompt}]}]
    batch = processor([messages], add_generation_prompt=True)        # decodes the images and videos
    model = load_model(checkpoint, device, dtype)
    if args.compile:
        model.fuse_projections()
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels" and v is not None}
    for k in ("pixel_values", "pixel_values_videos"):
        if k in inputs:
            inputs[k] = inputs[k].to(dtype)

    stream = TextStream(tok)
    t0 = time.perf_counter()
    generate(model, **inputs, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
             top_p=args.top_p, presence_penalty=args.presence_penalty, repetition_penalty=args.repetition_penalty,
             eos_ids=tok.eos_ids, pad_id=tok.pad_id, generator=torch.Generator(device).manual_seed(args.seed),
             cuda_graph=args.compile, on_token=stream)
    dt = time.perf_counter() - t0
    print(f"\n[{inputs['input_ids'].shape[1]} prompt tokens, {len(stream.ids)} new tokens in {dt:.1f} s]",
          file=sys.stderr)

    if args.ground is not None:
        from processor import draw_grounding, parse_grounding
        items = parse_grounding(stream.text())
        path = args.ground or os.path.splitext(args.image[0])[0] + "_ground.png"
        draw_grounding(args.image[0], items, path)
        print(f"[{len(items)} boxes/points drawn onto {args.image[0]} -> {path}]", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, TypeError) as e:      # a mistake in the arguments or the files
        raise SystemExit(f"sample.py: error: {e}") from None
