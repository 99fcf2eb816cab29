"""
Qwen3-VL-MoE (moe.py) against the reference `Qwen3VLMoeForConditionalGeneration` (transformers 4.57.6), built tiny
and random: the sparse block alone, the whole model on images + video + left padding, the load-balancing loss,
the two execution paths against each other, the layer rule, the presets' sizes and the checkpoint round trip.
"""
import json

import pytest
import torch
from conftest import make_batch, randomize_

import moe
from model import Qwen3VL, Qwen3VLConfig

E, K = 8, 2                 # experts, experts per token: small enough that some experts get no token


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
    """(reference, ours) with the same random weights, ours loaded from the reference's checkpoint."""
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


def block_pair(seed=0):
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextSparseMoeBlock
    hf_text = tiny_moe_config().text_config
    ref = randomize_(Qwen3VLMoeTextSparseMoeBlock(hf_text), seed)
    ours = moe.SparseMoeBlock(ours_config(tiny_moe_config()).text)
    ours.load_state_dict(ref.state_dict(), strict=True)                 # the same key names, 1:1
    return ref, ours


@pytest.mark.parametrize("impl", ["grouped", "loop"])
@pytest.mark.parametrize("ref_mode", ["eval", "train"])    # dense bmm over all experts / loop over hit experts
def test_block_matches_reference(impl, ref_mode):
    ref, ours = block_pair()
    ref.train(ref_mode == "train")
    ours.impl = impl
    x = torch.randn(3, 11, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_ref, logits_ref = ref(x)
        y, logits = ours(x)
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
def test_paths_agree_forward_and_gradients(monkeypatch, kernel):
    """loop vs grouped, forward and every gradient; kernel=True runs torch._grouped_mm itself (its CPU version)."""
    monkeypatch.setattr(moe, "has_grouped_mm_kernel", lambda x, w: kernel)
    _, block = block_pair(seed=3)
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
        for mode in (False, True):                                      # the reference's eval and train kernels
            assert_real_close(logits, ref.train(mode)(**kw).logits, kw["attention_mask"])
    ref.eval()
    moe.set_impl(ours, "grouped")
    assert [type(l.mlp).__name__ for l in ours.language_model.layers] == ["SparseMoeBlock", "MLP", "SparseMoeBlock"]
    assert len(ours.router_logits) == 2 and ours.router_logits[0].shape == (kw["input_ids"].numel(), E)


def test_loss_and_aux_loss_match_reference(moe_pair, batch):
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import load_balancing_loss_func
    ref, ours, _ = moe_pair
    with torch.no_grad():
        out = ref(**batch, output_router_logits=True)
        out_plain = ref(**batch)                                        # the reference's default: no aux loss
        _, loss = ours(**batch, aux_loss=True)
        aux = moe.load_balancing_loss(ours.router_logits, K, batch["attention_mask"])
        _, loss_plain = ours(**batch)
    assert out_plain.aux_loss is None
    torch.testing.assert_close(aux, out.aux_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_plain, out_plain.loss, atol=1e-5, rtol=0)
    assert (loss - loss_plain).item() == pytest.approx(0.01 * aux.item(), rel=1e-4)
    # the loss function alone, on logits of every magnitude, with and without a padding mask
    g = torch.Generator().manual_seed(0)
    logits = tuple(3 * torch.randn(2 * 9, E, generator=g) for _ in range(3))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    for m in (None, mask):
        torch.testing.assert_close(moe.load_balancing_loss(logits, K, m), load_balancing_loss_func(logits, E, K, m),
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
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextDecoderLayer
    hf = tiny_moe_config(num_hidden_layers=6, decoder_sparse_step=step, mlp_only_layers=only)
    cfg = ours_config(hf)
    with torch.device("meta"):
        ours = Qwen3VL(cfg)
        want = [type(Qwen3VLMoeTextDecoderLayer(hf.text_config, i).mlp).__name__.endswith("SparseMoeBlock")
                for i in range(6)]
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
        assert_real_close(ours(**kw)[0], ref(**kw).logits, kw["attention_mask"])
    again = Qwen3VL.from_pretrained(tmp_path / "ours")
    assert again.cfg == ours.cfg
    for (k, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_loader_refuses_moe_dense_mismatch(moe_pair, tmp_path):
    _, ours, path = moe_pair
    hf_cfg = json.loads((path / "config.json").read_text())
    # MoE weights under a dense config.json: the loader names the experts it did not expect
    dense = json.loads(json.dumps(hf_cfg))
    dense["model_type"] = "qwen3_vl"
    for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step",
              "mlp_only_layers", "router_aux_loss_coef", "norm_topk_prob"):
        dense["text_config"].pop(k)
    (tmp_path / "config.json").write_text(json.dumps(dense))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(ValueError, match=r"does not match the config.*mlp\.experts\.gate_up_proj"):
        Qwen3VL.from_pretrained(tmp_path)
    # inconsistent config.json files
    with pytest.raises(ValueError, match="is dense"):
        Qwen3VLConfig.from_hf_dict({**dense, "text_config": {**dense["text_config"], "num_experts": 8}})
    with pytest.raises(ValueError, match="needs text_config.num_experts"):
        Qwen3VLConfig.from_hf_dict({**dense, "model_type": "qwen3_vl_moe"})
    # and dense weights under an MoE config.json
    (tmp_path / "dense").mkdir()
    cfg = Qwen3VLConfig.from_hf_dict(dense)
    with torch.device("meta"):
        model = Qwen3VL(cfg)
    model.to_empty(device="cpu").save_pretrained(tmp_path / "dense")
    (tmp_path / "dense" / "config.json").write_text(json.dumps(hf_cfg))
    with pytest.raises(ValueError, match=r"does not match the config.*missing.*mlp\.experts"):
        Qwen3VL.from_pretrained(tmp_path / "dense")
