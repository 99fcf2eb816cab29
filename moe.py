"""
The Qwen3-VL-MoE sparse block (30B-A3B, 235B-A22B): a router sends each token to k of E SwiGLU experts
(reference §4; Hugging Face `Qwen3VLMoeTextSparseMoeBlock`, modeling_qwen3_vl_moe.py of transformers 4.57 and 5).

Notable features
- Router: a bias-free linear H -> E; softmax in float32 over ALL E experts, then the top k. The k weights are
  always renormalised to sum to 1 (the reference ignores `norm_topk_prob`, §7.12) and cast back to the activation
  dtype. No shared expert, no expert bias, no routed scaling factor.
- Experts stored fused, as in the released checkpoints (x @ W layout): `experts.gate_up_proj` [E, H, 2I], columns
  [:I] the gate and [I:] the up projection, and `experts.down_proj` [E, I, H]. Checkpoint files in the other
  layouts (transformers 5's transposed tensors, one nn.Linear per expert) are read and written through
  EXPERT_LAYOUTS, told apart by their names and shapes.
- Two execution paths, same maths (`SparseMoeBlock.impl`, or `set_impl(model, ...)` for a whole model):
    "loop"     for each expert: gather the tokens routed to it, run its SwiGLU, add the weighted output back.
               The one to read; its shapes depend on the routing, so every expert costs a host sync.
    "grouped"  (default) sort the T*k (token, slot) pairs by expert, so that each expert's rows are one contiguous
               block, and run each projection as ONE grouped matrix multiply over the E blocks
               (`torch._grouped_mm`). Fixed shapes and no host sync on a GPU with the kernel (CUDA bf16, sm90/sm100),
               so it compiles and captures in CUDA graphs; elsewhere the same sorted blocks go through one
               matmul each.
- Switch-Transformer load-balancing loss (Fedus et al. 2021, eq. 4-6), equal to the reference's
  `load_balancing_loss_func`, and the routing statistics it is made of (`tokens_per_expert`).

Flow (SparseMoeBlock.forward)
    x [B, S, H] -> [T, H] --gate--> logits [T, E] --softmax fp32, top-k, renormalise--> weights [T, k], experts [T, k]
    y[t] = sum_j weights[t, j] * Expert_{experts[t, j]}(x[t]),   Expert_e(x) = (silu(x @ G_e) * (x @ U_e)) @ D_e
    returns y [B, S, H] and the router logits [T, E] (for the auxiliary loss and routing statistics)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def is_moe_layer(cfg, layer_idx):
    """The reference's rule (§4): layer `layer_idx` is sparse unless it is listed in `mlp_only_layers`, the model has
    experts, and it is one of every `decoder_sparse_step` layers (all of them for the released models)."""
    return (layer_idx not in cfg.mlp_only_layers and cfg.num_experts > 0
            and (layer_idx + 1) % cfg.decoder_sparse_step == 0)


class Experts(nn.Module):
    """E independent SwiGLU MLPs, their weights stacked as the checkpoint stores them."""

    def __init__(self, num_experts, dim, hidden, std=0.02):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))   # [E, H, 2I]
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, dim))          # [E, I, H]
        nn.init.normal_(self.gate_up_proj, std=std)      # as the reference's _init_weights (initializer_range)
        nn.init.normal_(self.down_proj, std=std)


class SparseMoeBlock(nn.Module):
    """Top-k routed SwiGLU experts: forward(x [B, S, H]) -> (y [B, S, H], router_logits [B*S, E])."""

    def __init__(self, cfg):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)          # the router
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.impl = "grouped"                                                        # or "loop" (same results)

    def route(self, x):
        """x [T, H] -> router logits [T, E] (x.dtype), weights [T, k] (x.dtype, sum to 1), expert ids [T, k]."""
        logits = self.gate(x)                                                      # [T, E]
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)                     # [T, E] over all experts
        weights, experts = probs.topk(self.top_k, dim=-1)                          # [T, k] each, best first
        weights = weights / weights.sum(-1, keepdim=True)                          # renormalised to sum to 1
        return logits, weights.to(x.dtype), experts

    def forward(self, x):
        B, S, H = x.shape
        x = x.reshape(B * S, H)                                                    # [T, H]
        logits, weights, experts = self.route(x)
        run = {"loop": experts_loop, "grouped": experts_grouped}[self.impl]
        y = run(x, weights, experts, self.experts.gate_up_proj, self.experts.down_proj)   # [T, H]
        return y.view(B, S, H), logits


def set_impl(model, impl):
    """Select the execution path of every SparseMoeBlock in `model`: 'grouped' (the default) or 'loop'."""
    if impl not in ("grouped", "loop"):
        raise ValueError(f"unknown MoE impl {impl!r}; choose 'grouped' or 'loop'")
    for m in model.modules():
        if isinstance(m, SparseMoeBlock):
            m.impl = impl
    return model


# ----------------------------------------------------------------------------------------------------------
# The two execution paths: x [T, H], weights [T, k], experts [T, k], gate_up_proj [E, H, 2I], down_proj [E, I, H]
# -> y [T, H]. Both sum each token's k weighted expert outputs in float32 and round once to x.dtype.


def experts_loop(x, weights, experts, gate_up_proj, down_proj):
    """The readable path: one expert at a time."""
    I = down_proj.shape[1]
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)                 # [T, H]
    # unbind: one view per expert, whose backward stacks the E gradients at once (E separate gate_up_proj[e]
    # would each build a zero gradient as large as all the experts)
    for e, (w_gate_up, w_down) in enumerate(zip(gate_up_proj.unbind(0), down_proj.unbind(0))):
        token, slot = torch.where(experts == e)                                    # [n_e] each: who chose e, where
        h = x[token] @ w_gate_up                                                   # [n_e, 2I]
        a = F.silu(h[:, :I]) * h[:, I:]                                            # [n_e, I] SwiGLU
        out = (a @ w_down) * weights[token, slot, None]                            # [n_e, H] weighted
        y.index_add_(0, token, out.float())
    return y.to(x.dtype)


def experts_grouped(x, weights, experts, gate_up_proj, down_proj):
    """The fast path: the T*k (token, slot) pairs sorted by expert, each projection one grouped matmul."""
    T, k = experts.shape
    E, I = down_proj.shape[0], down_proj.shape[1]
    pair_expert = experts.flatten()                                                # [T*k] pair p = t*k + j
    order = pair_expert.argsort(stable=True)                                       # [T*k] pairs, expert by expert
    # rows per expert: a histogram that stays on the device (torch.bincount would ask the host for the max)
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, pair_expert,
                                                                             torch.ones_like(pair_expert))  # [E]
    ends = counts.cumsum(0).to(torch.int32)                                        # [E] end row of each block
    xs = x.index_select(0, order // k)                                             # [T*k, H] tokens, expert-sorted
    h = grouped_mm(xs, gate_up_proj, ends)                                         # [T*k, 2I]
    a = F.silu(h[:, :I]) * h[:, I:]                                                # [T*k, I] SwiGLU
    out = grouped_mm(a, down_proj, ends)                                           # [T*k, H] expert-sorted
    out = torch.empty_like(out).index_copy_(0, order, out)                         # [T*k, H] back in pair order
    return (out.view(T, k, -1) * weights[..., None]).sum(1, dtype=torch.float32).to(x.dtype)   # [T, H]


def grouped_mm(x, w, ends):
    """
    Row block g of x times w[g]: x [N, K] (block g = rows ends[g-1]:ends[g]), w [G, K, M], ends [G] int32 -> [N, M].
    torch._grouped_mm runs all blocks in one kernel, reading `ends` on the device, where PyTorch has that kernel
    (CUDA, bf16, compute capability 9.x/10.x: Hopper, Blackwell); it needs 16-byte aligned rows (K, M multiples of
    8), which every released config has. Elsewhere (CPU, fp32, older GPUs) torch._grouped_mm itself falls back to one
    matmul per block after copying `ends` to the host, and is slower on the CPU than this loop of the same matmuls.
    """
    if has_grouped_mm_kernel(x, w):
        return torch._grouped_mm(x, w, offs=ends)
    rows = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()                    # a host sync off the CPU
    return torch.cat([x_g @ w_g for x_g, w_g in zip(x.split(rows), w.unbind(0))])  # split, unbind: see experts_loop


def has_grouped_mm_kernel(x, w):
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == w.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device)[0] in (9, 10))


# ----------------------------------------------------------------------------------------------------------
# Routing statistics and the auxiliary load-balancing loss, from the router logits of every MoE layer
# (a list of [B*S, E], as Qwen3VL keeps in `model.router_logits` after a forward)


@torch.no_grad()
def tokens_per_expert(router_logits, top_k, attention_mask=None):
    """
    [L, E] float: how many tokens each expert received in each of the L MoE layers (each token counts once per
    expert among its top k); padding is left out when attention_mask [B, S] (1 = real token) is given.
    """
    probs = torch.stack(list(router_logits)).float().softmax(-1)                  # [L, T, E]
    chosen = probs.topk(top_k, dim=-1).indices                                     # [L, T, k]
    picked = torch.zeros_like(probs).scatter_(-1, chosen, 1.0)                     # [L, T, E] 1 = routed there
    return (picked * _real_tokens(attention_mask, probs)[:, None]).sum(1)          # [L, E]


def load_balancing_loss(router_logits, top_k, attention_mask=None):
    """
    Switch Transformer load-balancing loss over all MoE layers (the reference's `load_balancing_loss_func`):
        E * sum_e f_e * P_e,
    f_e = tokens routed to expert e / tokens (sums to k over e), P_e = mean router probability of e, both over the
    real tokens of every layer. Uniform routing gives k; all tokens on the same k experts give up to E.
    Only P_e carries a gradient. Computed in float32 (the reference keeps the logits' dtype: equal in float32).
    """
    probs = torch.stack(list(router_logits)).float().softmax(-1)                  # [L, T, E]
    L, T, E = probs.shape
    real = _real_tokens(attention_mask, probs)                                     # [T]
    n = L * real.sum()
    f = tokens_per_expert(router_logits, top_k, attention_mask).sum(0) / n         # [E]
    P = (probs * real[:, None]).sum((0, 1)) / n                                    # [E]
    return E * (f * P).sum()


def _real_tokens(attention_mask, probs):
    """[T] float: 1 for a real token, 0 for padding (all ones without a mask)."""
    T = probs.shape[1]
    if attention_mask is None:
        return probs.new_ones(T)
    if attention_mask.numel() != T:
        raise ValueError(f"attention_mask has {attention_mask.numel()} entries, the router logits {T} tokens")
    return attention_mask.reshape(T).to(probs)


# ----------------------------------------------------------------------------------------------------------
# The expert weights in checkpoint files. In memory they are always `gate_up_proj` [E, H, 2I] and `down_proj`
# [E, I, H] (x @ W); files hold one of these layouts (keys below `...mlp.experts.`), told apart by their key
# names and shapes, never by which library is assumed to have written them:

EXPERT_LAYOUTS = {
    "fused_in_out": "gate_up_proj [E, H, 2I] and down_proj [E, I, H] (x @ W): the released Qwen3-VL-MoE "
                    "checkpoints and transformers 4.57",
    "fused_out_in": "gate_up_proj [E, 2I, H] and down_proj [E, H, I] (nn.Linear's [out, in]): transformers 5",
    "per_expert": "{e}.gate_proj.weight, {e}.up_proj.weight [I, H] and {e}.down_proj.weight [H, I] for each "
                  "expert e (one nn.Linear each, as Qwen3-MoE and some quantised exports store them)",
}
_PER_EXPERT = ("gate_proj", "up_proj", "down_proj")


def experts_to_checkpoint(gate_up_proj, down_proj, layout):
    """Our expert weights [E, H, 2I], [E, I, H] -> {key below `experts.`: tensor} in a layout of EXPERT_LAYOUTS."""
    if layout == "fused_in_out":
        return {"gate_up_proj": gate_up_proj, "down_proj": down_proj}
    if layout == "fused_out_in":
        return {"gate_up_proj": gate_up_proj.transpose(1, 2).contiguous(),
                "down_proj": down_proj.transpose(1, 2).contiguous()}
    if layout == "per_expert":
        I = down_proj.shape[1]
        out = {}
        for e, (w_gate_up, w_down) in enumerate(zip(gate_up_proj.unbind(0), down_proj.unbind(0))):
            out.update({f"{e}.gate_proj.weight": w_gate_up[:, :I].T.contiguous(),        # [I, H]
                        f"{e}.up_proj.weight": w_gate_up[:, I:].T.contiguous(),          # [I, H]
                        f"{e}.down_proj.weight": w_down.T.contiguous()})                 # [H, I]
        return out
    raise ValueError(f"unknown expert layout {layout!r}; choose one of {sorted(EXPERT_LAYOUTS)}")


def expert_layout_of(shapes, num_experts, dim, hidden, where="experts"):
    """
    The layout of one layer's expert tensors. shapes: {key below `experts.`: shape}; dim H, hidden I. Both fused
    tensors together settle the orientation even where one alone cannot (gate_up_proj when 2I == H, down_proj
    when I == H: a loader that looks at one tensor at a time, as transformers 5's does, cannot tell). Anything
    that fits no layout is an error naming `where`, the keys and shapes found, and the layouts expected.
    """
    E, H, I = num_experts, dim, hidden
    expected = {"fused_in_out": {"gate_up_proj": [E, H, 2 * I], "down_proj": [E, I, H]},
                "fused_out_in": {"gate_up_proj": [E, 2 * I, H], "down_proj": [E, H, I]},
                "per_expert": {f"{e}.{p}.weight": [H, I] if p == "down_proj" else [I, H]
                               for e in range(E) for p in _PER_EXPERT}}
    found = {k: list(s) for k, s in shapes.items()}
    for layout, want in expected.items():
        if found == want:
            return layout
    summary = found if len(found) <= 4 else {k: found[k] for k in sorted(found)[:4]} | {"...": f"{len(found)} keys"}
    raise ValueError(f"{where}: the expert tensors {summary} fit no known layout; expected (E={E}, H={H}, I={I}) "
                     + "; or ".join(f"{name}: {EXPERT_LAYOUTS[name]}" for name in expected))


def experts_from_checkpoint(layout, get, num_experts):
    """One layer's experts in our layout, read with get(key below `experts.`) -> tensor from a checkpoint in
    `layout` (expert_layout_of). Returns gate_up_proj [E, H, 2I], down_proj [E, I, H]."""
    if layout == "fused_in_out":
        return get("gate_up_proj"), get("down_proj")
    if layout == "fused_out_in":
        return get("gate_up_proj").transpose(1, 2).contiguous(), get("down_proj").transpose(1, 2).contiguous()
    gate_up = torch.stack([torch.cat([get(f"{e}.gate_proj.weight"), get(f"{e}.up_proj.weight")]).T
                           for e in range(num_experts)])                               # [E, H, 2I]
    down = torch.stack([get(f"{e}.down_proj.weight").T for e in range(num_experts)])   # [E, I, H]
    return gate_up.contiguous(), down.contiguous()
