"""
Exports that the Hugging Face stack loads: Qwen3VL.save_pretrained(path, processor=...) writes the model, the
tokenizer (tokenizer.json from the tiktoken ranks), the chat template, the preprocessor configs and
generation_config.json; transformers' AutoTokenizer, AutoProcessor and AutoModelForImageTextToText load the
directory and give our ids, pixels and logits. Our own loaders read it back to the same objects.
"""
import json

import numpy as np
import pytest
import torch

from model import Qwen3VL, Qwen3VLConfig
from processor import Processor
from test_processor import photo
from test_tokenizer import CHATS, CORPUS, qwen_tokenizer, released_template, training_text
from tokenizer import Tokenizer

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": None}, {"type": "text", "text": "What is it?"},
                                     {"type": "image", "image": None}]},
        {"role": "assistant", "content": "Two photographs."},
        {"role": "user", "content": "Which one is brighter?"}]
BUDGET = dict(min_pixels=32 * 32, max_pixels=96 * 96)


@pytest.fixture(scope="module")
def export(pair, tmp_path_factory):
    """Our tiny model (the reference's random weights), the Qwen tokenizer with the released Instruct template, a
    processor with small pixel budgets: exported to one directory."""
    _, ours = pair
    tok = Tokenizer(qwen_tokenizer().ranks, chat_template=released_template("instruct"))
    processor = Processor(tok, **BUDGET)
    path = tmp_path_factory.mktemp("export") / "hf"
    ours.save_pretrained(path, processor=processor)
    return ours, processor, path


def images():
    return [photo("astronaut"), photo("coffee").resize((150, 90))]


def chat_with_images():
    astronaut, coffee = images()
    chat = json.loads(json.dumps(CHAT))
    chat[1]["content"][0]["image"], chat[1]["content"][2]["image"] = astronaut, coffee
    return chat


def test_files(export):
    ours, processor, path = export
    assert {p.name for p in path.iterdir()} == {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
        "preprocessor_config.json", "video_preprocessor_config.json", "generation_config.json"}
    assert json.loads((path / "generation_config.json").read_text()) == {
        "bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643}
    image = json.loads((path / "preprocessor_config.json").read_text())
    assert image["size"] == {"shortest_edge": 1024, "longest_edge": 9216} and image["patch_size"] == 16


def test_reference_tokenizer_loads_the_export(export):
    from transformers import AutoTokenizer
    _, processor, path = export
    hf = AutoTokenizer.from_pretrained(path)
    tok = processor.tok
    for text in CORPUS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text, allowed_special=True), text[:40]
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
    assert hf.decode([151645, 151667, 40], skip_special_tokens=True) == tok.decode([151645, 151667, 40], True)
    for chat in CHATS:
        chat = dict(chat)
        messages = chat.pop("messages")
        assert hf.apply_chat_template(messages, tokenize=False, **chat) == \
            tok.apply_chat_template(messages, tokenize=False, **chat)


def test_trained_tokenizer_exports_too(tmp_path):
    """A toy BPE (other ids, the same 26 special tokens after its ranks) through tokenizer.json."""
    from transformers import AutoTokenizer
    train, held_out = training_text()
    toy = Tokenizer.train([train[:200_000]], vocab_size=1000)
    toy.save_hf(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    assert again.ranks == toy.ranks and again.special == toy.special and again.chat_template is None
    for text in [held_out] + CORPUS:
        assert hf.encode(text, add_special_tokens=False) == toy.encode(text, allowed_special=True)
    assert hf.convert_tokens_to_ids("<|im_end|>") == toy.im_end_id == 1000 - 26 + 2


def test_reference_processor_and_model_load_the_export(export):
    """The reference's processor gives our ids and (PIL backend) our pixels exactly; its torchvision backend, the
    default, within resampling differences; its model loaded from the export gives our logits."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor
    ours, processor, path = export
    chat = chat_with_images()
    batch = processor([chat], add_generation_prompt=True)
    hf = AutoProcessor.from_pretrained(path)
    text = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == processor.tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ref = hf(text=[text], images=images(), return_tensors="pt")
    assert ref["input_ids"].tolist() == batch["input_ids"].tolist()
    assert ref["image_grid_thw"].tolist() == batch["image_grid_thw"].tolist()
    assert (ref["pixel_values"] - batch["pixel_values"]).abs().max() < 0.1
    pil = AutoImageProcessor.from_pretrained(path, backend="pil")(images=images(), return_tensors="pt")
    assert torch.equal(pil["pixel_values"], batch["pixel_values"])
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    with torch.no_grad():
        want = model(**kw, mm_token_type_ids=ref["mm_token_type_ids"]).logits
        got, _ = ours(**kw)
    assert (got - want).abs().max() <= 1e-5


def test_our_loaders_read_the_export(export):
    ours, processor, path = export
    again = Qwen3VL.from_pretrained(path)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values()))
    tok = Tokenizer.from_pretrained(path)
    assert tok.ranks == processor.tok.ranks and tok.chat_template == released_template("instruct")
    loaded = Processor.from_pretrained(path, tok)
    chat = chat_with_images()
    a, b = processor([chat]), loaded([chat])
    assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "pixel_values", "image_grid_thw"))
    assert (loaded.video_min_pixels, loaded.video_max_pixels, loaded.video_fps) == (4096, 25165824, 2.0)


def test_processor_configs_are_checked(tmp_path):
    tok = qwen_tokenizer()
    Processor(tok).save_pretrained(tmp_path)
    file = tmp_path / "preprocessor_config.json"
    good = json.loads(file.read_text())
    for change, error in [({"do_normalize": False}, r"preprocessor_config\.json: do_normalize must be True"),
                          ({"resample": 2}, r"resample must be 3"),
                          ({"crop_size": 224}, r"unknown key\(s\) \['crop_size'\]"),
                          ({"size": {"height": 448, "width": 448}}, r"unknown size key\(s\) \['height', 'width'\]"),
                          ({"patch_size": 14}, r"video_preprocessor_config\.json: patch_size is 16, "
                                               r"preprocessor_config\.json says 14")]:
        file.write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=error):
            Processor.from_pretrained(tmp_path, tok)
    file.write_text(json.dumps({"min_pixels": 2048, "max_pixels": 4096}))       # our earlier exports' file
    (tmp_path / "video_preprocessor_config.json").unlink()
    p = Processor.from_pretrained(tmp_path, tok)
    assert (p.min_pixels, p.max_pixels, p.video_max_pixels) == (2048, 4096, 25165824)
    assert p.process_image(np.zeros((100, 100, 3), np.uint8))[1] == (1, 4, 4)    # 64 x 64: within 2048..4096
    with torch.device("meta"):
        model = Qwen3VL(Qwen3VLConfig.from_preset("toy-cpu"))
    with pytest.raises(ValueError, match="the tokenizer has 151669 ids, the model's embedding 2048 rows"):
        model.save_pretrained(tmp_path / "toy", tokenizer=tok)
