"""
Qwen3-VL-MoE (moe.py) against the reference `Qwen3VLMoeForConditionalGeneration` (transformers, public API only),
built tiny and random: the sparse block alone, the whole model on images + video + left padding under each of
the reference's expert kernels, the load-balancing loss, the two execution paths against each other, the layer
rule, the presets' sizes, and checkpoints in every expert layout both ways.
"""
import copy
import dataclasses
import json

import pytest
import torch
from conftest import make_batch, randomize_, reference_inputs
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import moe
from model import Qwen3VL, Qwen3VLConfig

E, K = 8, 2                 # experts, experts per token: small enough that some experts get no token
REF_KERNELS = ["eager", "batched_mm", "grouped_mm"]     # the reference's expert implementations (same maths)


def tiny_moe_config(**text_overrides):
    from transformers import Qwen3VLMoeConfig
    text = dict(vocab_size=151936, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                rope_theta=5_000_000.0, max_position_embeddings=4096, tie_word_embeddings=False,
                rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True},
                num_experts=E, num_experts_per_tok=K, moe_intermediate_size=32, decoder_sparse_step=1,
                mlp_only_layers=[1], router_aux_loss_coef=0.01)    # layers 0, 2 sparse; 1 dense
    text.update(text_overrides)
    vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                  deepstack_visual_indexes=[0, 1, 2], num_position_embeddings=2304)
    return Qwen3VLMoeConfig(text_config=text, vision_config=vision)


def ours_config(hf_config):
    """Our config from a reference config, through the config.json text its save_pretrained writes."""
    return Qwen3VLConfig.from_hf_dict(json.loads(hf_config.to_json_string()))


@pytest.fixture(scope="module")
def moe_pair(tmp_path_factory):
    """
    (reference, ours, checkpoint dir) with the same random weights, ours loaded from the reference's checkpoint.
    H = 64 = 2I: the reference's gate_up_proj [E, 2I, H] has the shape of the other orientation [E, H, 2I], so only
    down_proj tells the layout (moe.expert_layout_of reads both).
    """
    from transformers import Qwen3VLMoeForConditionalGeneration
    torch.manual_seed(0)
    ref = randomize_(Qwen3VLMoeForConditionalGeneration(tiny_moe_config())).eval()
    path = tmp_path_factory.mktemp("moe") / "ref"
    ref.save_pretrained(path)
    return ref, Qwen3VL.from_pretrained(path).eval(), path


@pytest.fixture(scope="module")
def batch():
    kw = make_batch([[("text", 5), ("image", (1, 4, 4)), ("text", 3)],
                     [("text", 2), ("video", (2, 4, 4)), ("text", 4)],
                     [("text", 6)]])
    # a label counts only when the token before it is real: padding rows' logits differ by design (see below)
    after_pad = torch.nn.functional.pad(kw["attention_mask"][:, :-1], (1, 0), value=1) == 0
    kw["labels"] = kw["input_ids"].masked_fill((kw["attention_mask"] == 0) | after_pad, -100)
    return kw


def assert_real_close(ours, ref, attention_mask, atol=1e-5):
    """Padding rows differ by design (model.py keeps each query's own key); real tokens must match."""
    real = attention_mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=atol, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# The sparse block


@pytest.mark.parametrize("impl", ["grouped", "loop"])
@pytest.mark.parametrize("kernel", REF_KERNELS)
def test_block_matches_reference(moe_pair, impl, kernel):
    """Layer 0's sparse block of both models (the reference's reached through its public module tree)."""
    ref, ours, _ = moe_pair
    ref.set_experts_implementation(kernel)
    ref_block, block = ref.model.language_model.layers[0].mlp, ours.language_model.layers[0].mlp
    block.impl = impl
    x = torch.randn(3, 11, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_ref, logits_ref = ref_block(x), ref_block.gate(x)[0]
        y, logits = block(x)
    ref.set_experts_implementation("eager")
    block.impl = "grouped"
    assert y.shape == x.shape and logits.shape == (33, E)
    torch.testing.assert_close(logits, logits_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    assert y.abs().max() > 1e-2                                         # not trivially zero


def _grads(block, x):
    x = x.clone().requires_grad_()
    y, logits = block(x)
    ((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + logits.square().mean()).backward()
    out = [y.detach(), x.grad] + [p.grad for p in block.parameters()]
    block.zero_grad()
    return out


@pytest.mark.parametrize("kernel", [False, True])
def test_paths_agree_forward_and_gradients(moe_pair, monkeypatch, kernel):
    """loop vs grouped, forward and every gradient; kernel=True runs torch._grouped_mm itself (its CPU version)."""
    monkeypatch.setattr(moe, "has_grouped_mm_kernel", lambda x, w: kernel)
    block = copy.deepcopy(moe_pair[1].language_model.layers[0].mlp)
    for T in (5, 64):                                                  # 5 tokens x 2 slots: idle experts
        x = torch.randn(1, T, 64, generator=torch.Generator().manual_seed(T))
        block.impl = "loop"
        want = _grads(block, x)
        block.impl = "grouped"
        got = _grads(block, x)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        _, logits = block(torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(5)))
    assert moe.tokens_per_expert([logits], K).eq(0).any()              # the idle-expert case was exercised


# ----------------------------------------------------------------------------------------------------------
# The whole model


@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_model_logits_match_reference(moe_pair, batch, impl):
    ref, ours, _ = moe_pair
    kw = {k: v for k, v in batch.items() if k != "labels"}
    moe.set_impl(ours, impl)
    with torch.no_grad():
        logits, _ = ours(**kw)
        for kernel in REF_KERNELS:
            ref.set_experts_implementation(kernel)
            assert_real_close(logits, ref(**reference_inputs(kw)).logits, kw["attention_mask"])
    ref.set_experts_implementation("eager")
    moe.set_impl(ours, "grouped")
    assert [type(l.mlp).__name__ for l in ours.language_model.layers] == ["SparseMoeBlock", "MLP", "SparseMoeBlock"]
    assert len(ours.router_logits) == 2 and ours.router_logits[0].shape == (kw["input_ids"].numel(), E)


def test_loss_and_aux_loss_match_reference(moe_pair, batch):
    ref, ours, _ = moe_pair
    with torch.no_grad():
        out = ref(**reference_inputs(batch), output_router_logits=True)
        out_plain = ref(**reference_inputs(batch))                     # the reference's default: no aux loss
        _, loss = ours(**batch, aux_loss=True)
        aux = moe.load_balancing_loss(ours.router_logits, K, batch["attention_mask"])
        _, loss_plain = ours(**batch)
    assert out_plain.aux_loss is None
    torch.testing.assert_close(aux, out.aux_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_plain, out_plain.loss, atol=1e-5, rtol=0)
    assert (loss - loss_plain).item() == pytest.approx(0.01 * aux.item(), rel=1e-4)
    # the loss function alone, on the reference's router logits, with the padding mask and, for a row without
    # padding, without one; then on peaked routing (the router weights scaled up: logits of every magnitude)
    torch.testing.assert_close(moe.load_balancing_loss(out.router_logits, K, batch["attention_mask"]), out.aux_loss,
                               atol=1e-6, rtol=0)
    row = batch["input_ids"][2:, -6:]
    gates = [layer.mlp.gate.weight for layer in ref.model.language_model.layers if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        for scale in (1.0, 30.0):
            for w in gates:
                w.mul_(scale)
            plain = ref(input_ids=row, attention_mask=torch.ones_like(row), output_router_logits=True)
            for w in gates:
                w.div_(scale)
            torch.testing.assert_close(moe.load_balancing_loss(plain.router_logits, K), plain.aux_loss,
                                       atol=1e-6, rtol=0)


def test_tokens_per_expert(moe_pair, batch):
    _, ours, _ = moe_pair
    with torch.no_grad():
        ours(**{k: v for k, v in batch.items() if k != "labels"})
    load = moe.tokens_per_expert(ours.router_logits, K, batch["attention_mask"])       # [L, E]
    assert load.shape == (2, E)
    assert load.sum(1).tolist() == [K * batch["attention_mask"].sum().item()] * 2      # each real token k times
    full = moe.tokens_per_expert(ours.router_logits, K)
    assert full.sum(1).tolist() == [K * batch["input_ids"].numel()] * 2


def test_aux_loss_gradient_reaches_the_router(moe_pair, batch):
    _, ours, _ = moe_pair
    ours.zero_grad()
    _, loss = ours(**{k: v for k, v in batch.items() if k != "labels"}, labels=batch["labels"], aux_loss=True)
    loss.backward()
    assert ours.language_model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    assert ours.language_model.layers[2].mlp.experts.down_proj.grad.abs().sum() > 0
    ours.zero_grad()
    # a loss computed outside the forward (as train.py does) reaches the routers through model.router_logits
    ours(**{k: v for k, v in batch.items() if k != "labels"})
    moe.load_balancing_loss(ours.router_logits, K, batch["attention_mask"]).backward()
    assert ours.language_model.layers[2].mlp.gate.weight.grad.abs().sum() > 0
    ours.zero_grad()


# ----------------------------------------------------------------------------------------------------------
# Config: the layer rule, presets, config.json, checkpoints


@pytest.mark.parametrize("step, only", [(1, []), (2, []), (3, [2]), (1, [0, 3])])
def test_sparse_layer_rule_matches_reference(step, only):
    from transformers import Qwen3VLMoeForConditionalGeneration
    hf = tiny_moe_config(num_hidden_layers=6, decoder_sparse_step=step, mlp_only_layers=only)
    with torch.device("meta"):
        ours = Qwen3VL(ours_config(hf))
        ref = Qwen3VLMoeForConditionalGeneration(hf)
    want = [hasattr(layer.mlp, "experts") for layer in ref.model.language_model.layers]
    assert [isinstance(l.mlp, moe.SparseMoeBlock) for l in ours.language_model.layers] == want


@pytest.mark.parametrize("name, total, active", [("qwen3-vl-30b-a3b", 31_070_754_032, 3_891_664_112),
                                                 ("qwen3-vl-235b-a22b", 235_670_022_896, 22_767_151_856)])
def test_moe_preset_sizes(name, total, active):
    """Reference §1.4: 31.07 B total / 3.89 B active and 235.67 B / 22.77 B."""
    with torch.device("meta"):
        model = Qwen3VL(Qwen3VLConfig.from_preset(name))
    assert model.num_params() == total
    assert model.num_active_params() == active
    assert model.cfg.to_hf_dict()["model_type"] == "qwen3_vl_moe"


def test_save_then_reference_loads(moe_pair, batch, tmp_path):
    from transformers import Qwen3VLMoeForConditionalGeneration
    _, ours, _ = moe_pair
    ours.save_pretrained(tmp_path / "ours")
    ref = Qwen3VLMoeForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    kw = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert_real_close(ours(**kw)[0], ref(**reference_inputs(kw)).logits, kw["attention_mask"])
    again = Qwen3VL.from_pretrained(tmp_path / "ours")
    assert again.cfg == ours.cfg
    for (k, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_loader_refuses_moe_dense_mismatch(moe_pair, tmp_path):
    _, ours, path = moe_pair
    hf_cfg = json.loads((path / "config.json").read_text())
    # MoE weights under a dense config.json: the loader names the experts it did not expect
    dense = Qwen3VLConfig(text=dataclasses.replace(ours.cfg.text, num_experts=0), vision=ours.cfg.vision).to_hf_dict()
    (tmp_path / "config.json").write_text(json.dumps(dense))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(ValueError, match=r"does not match the config.*mlp\.experts\.gate_up_proj"):
        Qwen3VL.from_pretrained(tmp_path)
    # inconsistent config.json files
    with pytest.raises(ValueError, match="is dense"):
        Qwen3VLConfig.from_hf_dict({**dense, "text_config": {**dense["text_config"], "num_experts": 8}})
    no_experts = {k: v for k, v in hf_cfg["text_config"].items() if k not in ("num_experts", "num_local_experts")}
    with pytest.raises(ValueError, match="needs text_config.num_experts"):
        Qwen3VLConfig.from_hf_dict({**hf_cfg, "text_config": no_experts})
    # and dense weights under an MoE config.json
    (tmp_path / "dense").mkdir()
    with torch.device("meta"):
        model = Qwen3VL(Qwen3VLConfig.from_hf_dict(dense))
    model.to_empty(device="cpu").save_pretrained(tmp_path / "dense")
    (tmp_path / "dense" / "config.json").write_text(json.dumps(hf_cfg))
    with pytest.raises(ValueError, match=r"does not match the config.*missing.*mlp\.experts"):
        Qwen3VL.from_pretrained(tmp_path / "dense")


# ----------------------------------------------------------------------------------------------------------
# Expert layouts in checkpoint files (moe.EXPERT_LAYOUTS)


def random_moe(I, seed=0):
    """Ours alone, random, H = 64 and moe_intermediate_size I."""
    with torch.device("meta"):
        model = Qwen3VL(ours_config(tiny_moe_config(moe_intermediate_size=I)))
    return randomize_(model.to_empty(device="cpu"), seed).eval()


def expert_shapes(path, layer=0):
    prefix = f"model.language_model.layers.{layer}.mlp.experts."
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k[len(prefix):]: f.get_slice(k).get_shape() for k in f.keys() if k.startswith(prefix)}


@pytest.mark.parametrize("I", [32, 64, 24])       # 2I == H, I == H (one fused tensor alone is ambiguous), neither
@pytest.mark.parametrize("layout", sorted(moe.EXPERT_LAYOUTS))
def test_every_expert_layout_round_trips(tmp_path, layout, I):
    H = 64
    model = random_moe(I)
    model.save_pretrained(tmp_path, expert_layout=layout)
    shapes = expert_shapes(tmp_path)
    if layout == "per_expert":
        assert len(shapes) == 3 * E and shapes["7.gate_proj.weight"] == shapes["7.up_proj.weight"] == [I, H]
        assert shapes["7.down_proj.weight"] == [H, I]
        w = load_file(tmp_path / "model.safetensors")
        experts = model.language_model.layers[2].mlp.experts
        p = "model.language_model.layers.2.mlp.experts.5."
        assert torch.equal(w[p + "gate_proj.weight"], experts.gate_up_proj[5, :, :I].T)
        assert torch.equal(w[p + "up_proj.weight"], experts.gate_up_proj[5, :, I:].T)
        assert torch.equal(w[p + "down_proj.weight"], experts.down_proj[5].T)
    else:
        assert shapes == {"fused_in_out": {"gate_up_proj": [E, H, 2 * I], "down_proj": [E, I, H]},
                          "fused_out_in": {"gate_up_proj": [E, 2 * I, H], "down_proj": [E, H, I]}}[layout]
    again = Qwen3VL.from_pretrained(tmp_path)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("format", ["v5", "v4"])
def test_reference_loads_both_formats(tmp_path, batch, format):
    """Our v5 export (fused [out, in] experts) and v4 export (the released [in, out] experts, which transformers 5
    transposes on load where the shapes tell it to: I = 24, neither 2I nor I equal to H)."""
    from transformers import Qwen3VLMoeForConditionalGeneration
    model = random_moe(24)
    model.save_pretrained(tmp_path, format=format)
    assert expert_shapes(tmp_path)["down_proj"] == ([E, 64, 24] if format == "v5" else [E, 24, 64])
    ref = Qwen3VLMoeForConditionalGeneration.from_pretrained(tmp_path).eval()
    kw = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert_real_close(model(**kw)[0], ref(**reference_inputs(kw)).logits, kw["attention_mask"])


def test_expert_tensors_that_fit_no_layout(moe_pair, tmp_path):
    _, ours, path = moe_pair
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    tensors = load_file(path / "model.safetensors")
    key = "model.language_model.layers.2.mlp.experts.down_proj"
    save_file({**tensors, key: tensors[key][:, :, :-1].contiguous()}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: model\.language_model\.layers\.2\.mlp\.experts: the "
                                         r"expert tensors .*'down_proj': \[8, 64, 31\].* fit no known layout; "
                                         r"expected \(E=8, H=64, I=32\) fused_in_out: .*fused_out_in: .*per_expert"):
        Qwen3VL.from_pretrained(tmp_path)
    ours.save_pretrained(tmp_path, expert_layout="per_expert")       # one expert's down_proj missing
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.language_model.layers.0.mlp.experts.5.down_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.experts: the expert tensors .*'\.\.\.': '23 keys'"):
        Qwen3VL.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unknown expert layout 'fused'"):
        ours.save_pretrained(tmp_path, expert_layout="fused")
