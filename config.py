"""
Qwen3-VL's configuration and its Hugging Face files: the config dataclasses and their checks, the presets of every
released size and the toy ones, config.json of both generations (transformers 4.57 and 5.x, dense and MoE), and
where a checkpoint's tensors are and what they are called (the key table HF_PREFIXES). model.py builds the model
from these; nothing here needs torch.
"""
import copy
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields

from checks import check_number

# ----------------------------------------------------------------------------------------------------------
# Config (reference §1)

# Every size field: (smallest, largest) allowed. The largest are far above every released model (vocab 151,936,
# width 8,192, 94 layers, 128 experts, 262,144 positions), so that a corrupt or hostile config.json is refused
# here, with the limit named, rather than when the model is allocated.
TEXT_LIMITS = dict(vocab_size=(1, 2**22), hidden_size=(1, 2**16), intermediate_size=(1, 2**18),
                   num_hidden_layers=(1, 1024), num_attention_heads=(1, 1024), num_key_value_heads=(1, 1024),
                   head_dim=(1, 1024), max_position_embeddings=(1, 2**24), num_experts=(0, 4096),
                   moe_intermediate_size=(1, 2**18), decoder_sparse_step=(1, 1024))
VISION_LIMITS = dict(depth=(1, 1024), hidden_size=(1, 2**16), intermediate_size=(1, 2**18), num_heads=(1, 1024),
                     patch_size=(1, 256), temporal_patch_size=(1, 64), spatial_merge_size=(1, 64),
                     in_channels=(1, 64), num_position_embeddings=(1, 2**20), out_hidden_size=(1, 2**16))


# The ablation switches: each field (a dotted name for a sub-config's) with the paper's value, which the released
# checkpoints compute. Any other value is a different architecture: saved in our own checkpoints (to_hf_dict with
# ablations=True, under the top-level key "ablations"), refused by a Hugging Face export.
#   deepstack          False: the ViT's intermediate features are not added to the first LLM layers (Qwen3-VL §2.2)
#   text.mrope_layout  MROPE_LAYOUTS: which axis each rotary frequency slot turns with (rope.mrope_cos_sin) or
#                      "text", 1-D positions for every token (rope.rope_index)
#   video_time         VIDEO_TIMES: how a video's frame groups know their time (processor.py, rope.rope_index)
ABLATIONS = {"deepstack": True, "text.mrope_layout": "interleaved", "video_time": "timestamps"}
MROPE_LAYOUTS = ("interleaved", "chunked", "text")
# "timestamps" (Qwen3-VL §2.3): a text timestamp "<t seconds>" before each frame group, each group its own block
# "trope" (Qwen2.5-VL): no timestamp text, the video one block whose temporal positions advance with the frames'
#         time in seconds (rope.TROPE_TOKENS_PER_SECOND per second)
# "none": no timestamp text, no time positions: the frame groups as plain consecutive blocks
VIDEO_TIMES = ("timestamps", "trope", "none")


def _check_layer_list(name, layers, n, n_name):
    """A list of distinct layer indexes, each in [0, n)."""
    if not (isinstance(layers, (list, tuple)) and len(set(layers)) == len(layers)
            and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in layers)):
        raise ValueError(f"{name}={layers!r}: must be a list of distinct layer indexes in [0, {n_name}={n})")


@dataclass
class VisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    num_position_embeddings: int = 2304           # a 48 x 48 learned grid
    out_hidden_size: int = 4096                   # = the LLM width
    deepstack_visual_indexes: list = field(default_factory=lambda: [8, 16, 24])

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raises TypeError / ValueError '<field>=<value>: <what is allowed>' for a ViT that cannot be built."""
        for name, (low, high) in VISION_LIMITS.items():
            check_number(f"vision.{name}", getattr(self, name), low, high, integer=True)
        head_dim, rest = divmod(self.hidden_size, self.num_heads)
        if rest or head_dim % 4:              # 2-D RoPE: a quarter of a head's dims turns with rows, one with columns
            raise ValueError(f"vision.num_heads={self.num_heads}: must divide vision.hidden_size={self.hidden_size} "
                             "into heads whose size is a multiple of 4")
        side = math.isqrt(self.num_position_embeddings)
        if side * side != self.num_position_embeddings:
            raise ValueError(f"vision.num_position_embeddings={self.num_position_embeddings}: must be a square "
                             "(the learned table is a G x G grid)")
        _check_layer_list("vision.deepstack_visual_indexes", self.deepstack_visual_indexes, self.depth, "vision.depth")


@dataclass
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: list = field(default_factory=lambda: [24, 20, 20])   # sums to head_dim / 2
    # which position each rotary frequency slot turns with (rope.py; an ablation switch, ABLATIONS):
    # "interleaved" (Qwen3-VL), "chunked" (Qwen2-VL / Qwen2.5-VL) or "text" (1-D positions, visual tokens numbered
    # like text)
    mrope_layout: str = "interleaved"
    max_position_embeddings: int = 262144
    # RoPE context extension (rope.rope_frequencies): None, or {"rope_type": "yarn" | "linear", "factor": ...,
    # other keys of ROPE_SCALING_KEYS}, e.g. the released YaRN for 1M tokens: {"rope_type": "yarn", "factor": 3.0,
    # "original_max_position_embeddings": 262144}
    rope_scaling: dict = None
    # Mixture of experts (moe.py); num_experts == 0 means every layer is a dense SwiGLU MLP
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    router_aux_loss_coef: float = 0.001

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raises TypeError / ValueError '<field>=<value>: <what is allowed>' for a decoder that cannot be built."""
        for name, (low, high) in TEXT_LIMITS.items():
            check_number(f"text.{name}", getattr(self, name), low, high, integer=True)
        check_number("text.rms_norm_eps", self.rms_norm_eps, 0, 1, low_open=True)
        check_number("text.rope_theta", self.rope_theta, 0, low_open=True)
        check_number("text.router_aux_loss_coef", self.router_aux_loss_coef, 0)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"text.num_key_value_heads={self.num_key_value_heads}: must divide "
                             f"text.num_attention_heads={self.num_attention_heads} (each kv head serves a group)")
        section = self.mrope_section
        if not (isinstance(section, (list, tuple)) and len(section) == 3
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in section)
                and 2 * sum(section) == self.head_dim):
            raise ValueError(f"text.mrope_section={section!r}: must be 3 integers >= 0 (t, h, w) summing to "
                             f"text.head_dim / 2 = {self.head_dim / 2:g}")
        if self.mrope_layout not in MROPE_LAYOUTS:
            raise ValueError(f"text.mrope_layout={self.mrope_layout!r}: must be one of {', '.join(MROPE_LAYOUTS)}")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)
        if self.num_experts > 0:
            check_number("text.num_experts_per_tok", self.num_experts_per_tok, 1, self.num_experts, integer=True)
        _check_layer_list("text.mlp_only_layers", self.mlp_only_layers, self.num_hidden_layers,
                          "text.num_hidden_layers")

    @property
    def context_length(self):
        """The longest row the RoPE is made for: max_position_embeddings, or with a RoPE scaling factor x
        original_max_position_embeddings (its default: max_position_embeddings) when that is longer."""
        if self.rope_scaling is None:
            return self.max_position_embeddings
        original = self.rope_scaling.get("original_max_position_embeddings", self.max_position_embeddings)
        return max(self.max_position_embeddings, int(self.rope_scaling["factor"] * original))


# The keys of each RoPE scaling type (rope.rope_frequencies), each with the values allowed: (smallest, largest) for
# numbers, bool for a switch.
ROPE_SCALING_KEYS = {
    "linear": dict(factor=(1, 1e6)),
    "yarn": dict(factor=(1, 1e6), original_max_position_embeddings=(1, 2**24), attention_factor=(0, 1e6),
                 beta_fast=(0, 1e6), beta_slow=(0, 1e6), mscale=(0, 1e6), mscale_all_dim=(0, 1e6), truncate=bool),
}


def _check_rope_scaling(scaling):
    """text.rope_scaling: a dict of a known rope_type with its required factor and only its own keys, in range."""
    name = "text.rope_scaling"
    if not isinstance(scaling, dict):
        raise TypeError(f"{name}={scaling!r}: must be a dict with rope_type and factor, or None")
    rope_type = scaling.get("rope_type")
    if rope_type not in ROPE_SCALING_KEYS:
        why = (" (its frequencies follow the longest sequence the reference's module has seen so far, a state that "
               "a pure function of the positions cannot reproduce)") if rope_type == "dynamic" else ""
        raise ValueError(f"{name}: rope_type {rope_type!r} is not implemented{why}; supported: default (rope_scaling "
                         f"None), {', '.join(ROPE_SCALING_KEYS)}")
    known = ROPE_SCALING_KEYS[rope_type]
    unknown = sorted(set(scaling) - set(known) - {"rope_type"})
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {unknown} for rope_type {rope_type!r}; known: {sorted(known)}")
    if "factor" not in scaling:
        raise ValueError(f"{name}: rope_type {rope_type!r} needs a factor")
    for key, allowed in known.items():
        if key not in scaling:
            continue
        if allowed is bool:
            if not isinstance(scaling[key], bool):
                raise TypeError(f"{name}.{key}={scaling[key]!r}: must be True or False")
        else:
            check_number(f"{name}.{key}", scaling[key], *allowed, integer=key == "original_max_position_embeddings",
                         low_open=allowed[0] == 0)
    if scaling.get("beta_fast", 32) < scaling.get("beta_slow", 1):
        raise ValueError(f"{name}: beta_fast={scaling.get('beta_fast', 32)} must be >= beta_slow="
                         f"{scaling.get('beta_slow', 1)} (the ramp runs from the fast frequencies to the slow)")


@dataclass
class Qwen3VLConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    # ablation switches (ABLATIONS), the paper's design by default:
    deepstack: bool = True                # False: no DeepStack mergers, nothing added to the first LLM layers
    video_time: str = "timestamps"        # "timestamps" (Qwen3-VL), "trope" (Qwen2.5-VL), "none"; see VIDEO_TIMES

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Checks the parts (TextConfig / VisionConfig.validate) and how they fit together; raises TypeError /
        ValueError '<field>=<value>: <what is allowed>'. Runs on construction and again when a model is built."""
        for name, cls in (("text", TextConfig), ("vision", VisionConfig)):
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"{name}={getattr(self, name)!r}: must be a {cls.__name__}")
        self.text.validate()
        self.vision.validate()
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(f"vision.out_hidden_size={self.vision.out_hidden_size}: must equal "
                             f"text.hidden_size={self.text.hidden_size} (visual tokens enter the LLM)")
        if len(self.vision.deepstack_visual_indexes) > self.text.num_hidden_layers:
            raise ValueError(f"vision.deepstack_visual_indexes={self.vision.deepstack_visual_indexes}: at most "
                             f"text.num_hidden_layers={self.text.num_hidden_layers} levels (one per LLM layer)")
        for name in ("tie_word_embeddings", "deepstack"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r}: must be True or False")
        if self.video_time not in VIDEO_TIMES:
            raise ValueError(f"video_time={self.video_time!r}: must be one of {', '.join(VIDEO_TIMES)}")
        if self.video_time == "trope" and self.text.mrope_layout == "text":
            raise ValueError("video_time='trope' with text.mrope_layout='text': 1-D positions have no time axis to "
                             "carry the frames' times; choose video_time 'none' or another layout")
        ids = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        for name in ids:
            check_number(name, getattr(self, name), 0, self.text.vocab_size - 1, integer=True)
        if len({getattr(self, name) for name in ids}) < len(ids):
            raise ValueError(f"{', '.join(f'{n}={getattr(self, n)}' for n in ids)}: must be four different ids")

    def ablations(self):
        """The switches of ABLATIONS whose value is not the paper's: {dotted field: value}, empty by default."""
        out = {}
        for key, paper in ABLATIONS.items():
            value = get_field(self, key)
            if value != paper:
                out[key] = value
        return out

    @classmethod
    def from_preset(cls, name, **overrides):
        """A released size ('qwen3-vl-2b', ...) or a toy size ('toy-cpu', 'toy-gpu'); overrides as
        `text={...}`, `vision={...}` or top-level fields. A toy size's special-token ids are those of a tokenizer
        trained here with text.vocab_size ids (trained_tokenizer_ids) unless overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        p = PRESETS[name]
        text = {**p.get("text", {}), **overrides.pop("text", {})}
        vision = {**p.get("vision", {}), **overrides.pop("vision", {})}
        top = {k: v for k, v in p.items() if k not in ("text", "vision")}
        if name.startswith("toy-"):
            top.update(trained_tokenizer_ids(text["vocab_size"]))
        return cls(text=_build(TextConfig, text, "text"), vision=_build(VisionConfig, vision, "vision"),
                   **{**top, **overrides})

    # -- Hugging Face config.json, both generations of the format (HF_FORMATS) --

    @classmethod
    def from_hf_dict(cls, d, where="config.json"):
        """
        Our config from a Hugging Face config.json dict written by transformers 4.57 or 5.x (dense or MoE). Each key
        is read, checked against the one value implemented here (HF_FIXED_VALUES), or listed as harmless
        (HF_HARMLESS_KEYS); anything else is refused with its name. `where` names the file in the errors. The
        top-level "ablations" object of our own checkpoints (to_hf_dict(ablations=True)) sets the switches.
        """
        if not isinstance(d, dict):
            raise TypeError(f"{where} must hold a JSON object, got {type(d).__name__}")
        d = copy.deepcopy(d)                             # keys are popped as they are read
        model_type = d.pop("model_type", None)
        if model_type not in ("qwen3_vl", "qwen3_vl_moe"):
            raise ValueError(f"{where}: model_type is {model_type!r}; expected 'qwen3_vl' or 'qwen3_vl_moe'")
        moe = model_type == "qwen3_vl_moe"
        text, vision = d.pop("text_config", {}), d.pop("vision_config", {})
        for name, section in (("text_config", text), ("vision_config", vision)):
            if not isinstance(section, dict):
                raise TypeError(f"{where}: {name}={section!r}: must be a JSON object")
        # the generation of the file: its transformers_version (an unknown version is refused), else its RoPE keys
        # (a file without them is refused below: the two generations default rope_theta differently)
        generation = hf_format_of(d, where) or ("v5" if "rope_parameters" in text else "v4")
        for section, name, allowed in ((text, "text_config", HF_SUB_MODEL_TYPES[model_type]["text"]),
                                       (vision, "vision_config", HF_SUB_MODEL_TYPES[model_type]["vision"])):
            if section.get("model_type", allowed[0]) not in allowed:
                raise ValueError(f"{where}: {name}.model_type is {section['model_type']!r}; expected one of {allowed}")
            section.pop("model_type", None)
        _read_text_rope(text, where)
        switches = _read_ablations(d, text, where)
        if "num_local_experts" in text:                  # transformers 5's name of num_experts
            n = text.pop("num_local_experts")
            if text.setdefault("num_experts", n) != n:
                raise ValueError(f"{where}: text_config.num_experts ({text['num_experts']}) and num_local_experts "
                                 f"({n}) disagree")
        if not moe and text.get("num_experts", 0) > 0:
            raise ValueError(f"{where}: model_type 'qwen3_vl' is dense, but text_config.num_experts > 0 "
                             "(an MoE checkpoint has model_type 'qwen3_vl_moe')")
        if moe and "num_experts" not in text:
            raise ValueError(f"{where}: model_type 'qwen3_vl_moe' needs text_config.num_experts (5.x: "
                             "num_local_experts), num_experts_per_tok and moe_intermediate_size; the reference's "
                             "defaults are not guessed")
        # The flag that ties the head: 4.57 reads text_config's (default False), 5.x the top-level one (default
        # False; 5.x also writes a text_config flag that it never reads, True for the MoE models).
        top, sub = d.pop("tie_word_embeddings", None), text.pop("tie_word_embeddings", None)
        tie = {"v4": sub, "v5": top}[generation]
        if tie not in (None, True, False):
            raise TypeError(f"{where}: tie_word_embeddings={tie!r}: must be True or False")
        for section, name in ((d, ""), (text, "text_config."), (vision, "vision_config.")):
            for key, want in HF_FIXED_VALUES.get(name.rstrip("."), {}).items():
                if key in section and section.pop(key) != want:
                    raise ValueError(f"{where}: {name}{key} must be {want!r} (the architecture implemented here)")
            for key in HF_HARMLESS_KEYS:
                section.pop(key, None)
        try:                                             # what the config cannot run is named with the file
            return cls(text=_build(TextConfig, text, "text_config"),
                       vision=_build(VisionConfig, vision, "vision_config"), tie_word_embeddings=bool(tie),
                       **_checked(cls, d, "top-level", skip=("text", "vision", "tie_word_embeddings", *ABLATIONS)),
                       **switches)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{where}: {e}") from None

    def to_hf_dict(self, format="v5", ablations=False):
        """
        The config.json of this model in a format of HF_FORMATS: "v5" (transformers 5, the default) or "v4"
        (transformers 4.57, as the released Qwen3-VL checkpoints). Written complete, the RoPE settings included,
        since the two generations of the reference default differently when a key is missing.
        A config with ablation switches (ABLATIONS) other than the paper's is refused (ValueError naming the field):
        transformers would run its weights as the paper's architecture. ablations=True (our own checkpoints,
        train.py) writes them instead under the top-level key "ablations", which from_hf_dict reads back.
        """
        if format not in HF_FORMATS:
            raise ValueError(f"unknown config.json format {format!r}; choose one of {sorted(HF_FORMATS)}")
        changed = self.ablations()
        if changed and not ablations:
            key, value = next(iter(changed.items()))
            raise ValueError(f"{key}={value!r}: a Hugging Face checkpoint holds the paper's architecture "
                             f"({key}={ABLATIONS[key]!r}); transformers would run this model's weights without the "
                             "ablation")
        moe = self.text.num_experts > 0
        model_type = "qwen3_vl_moe" if moe else "qwen3_vl"
        text = asdict(self.text)
        rope = {**(text.pop("rope_scaling") or {"rope_type": "default"}), "mrope_section": text.pop("mrope_section"),
                "mrope_interleaved": text.pop("mrope_layout") != "chunked"}   # "text": t = h = w, any layout
        theta = text.pop("rope_theta")
        if not moe:
            for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step",
                      "mlp_only_layers", "router_aux_loss_coef"):
                text.pop(k)
        elif format == "v5":
            text["num_local_experts"] = text.pop("num_experts")
        else:
            text["norm_topk_prob"] = True
        if format == "v5":
            text["rope_parameters"] = {**rope, "rope_theta": theta}
        else:
            text.update(rope_scaling=rope, rope_theta=theta)
        sub_types = HF_SUB_MODEL_TYPES[model_type]
        # the head's tie twice: 4.57 reads text_config's flag, 5.x the top-level one
        text.update(model_type=sub_types["text"][0], tie_word_embeddings=self.tie_word_embeddings,
                    **copy.deepcopy(HF_FIXED_VALUES["text_config"]))
        vision = {**asdict(self.vision), "model_type": sub_types["vision"][format == "v5"],
                  **copy.deepcopy(HF_FIXED_VALUES["vision_config"])}
        if format == "v4":
            vision.pop("rope_parameters")                # 4.57 has the vision RoPE theta built in
        return {"architectures": ["Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"],
                "model_type": model_type, "transformers_version": HF_FORMATS[format],
                "text_config": text, "vision_config": vision,
                "tie_word_embeddings": self.tie_word_embeddings, "image_token_id": self.image_token_id,
                "video_token_id": self.video_token_id, "vision_start_token_id": self.vision_start_token_id,
                "vision_end_token_id": self.vision_end_token_id, **({"ablations": changed} if changed else {})}


# The two generations of config.json (and of MoE expert tensors, moe.EXPERT_LAYOUTS), each with the transformers
# version whose layout `to_hf_dict` writes:
#   "v4"  transformers 4.57 (the released Qwen3-VL checkpoints): text_config.rope_theta + rope_scaling,
#         num_experts, norm_topk_prob; vision_config.model_type "qwen3_vl" / "qwen3_vl_moe".
#   "v5"  transformers 5: text_config.rope_parameters (type, theta, MRoPE sections), num_local_experts;
#         vision_config.rope_parameters (axial, theta 10000) and model_type "qwen3_vl_vision" / ...
HF_FORMATS = {"v4": "4.57.6", "v5": "5.24.0"}
HF_EXPERT_LAYOUT = {"v4": "fused_in_out", "v5": "fused_out_in"}    # the MoE expert tensors of each format
HF_SUB_MODEL_TYPES = {   # text_config / vision_config model_type per top-level model_type: (v4, v5) names
    "qwen3_vl": {"text": ("qwen3_vl_text",), "vision": ("qwen3_vl", "qwen3_vl_vision")},
    "qwen3_vl_moe": {"text": ("qwen3_vl_moe_text",), "vision": ("qwen3_vl_moe", "qwen3_vl_moe_vision")},
}

# Keys whose only value is the architecture implemented here: another value is refused.
HF_FIXED_VALUES = {
    "text_config": {"hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0},
    "vision_config": {"hidden_act": "gelu_pytorch_tanh",
                      "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0}},   # rope.vision_cos_sin
}

# Keys of a Hugging Face config.json that do not change what the model computes, each with the reason. They are
# dropped when read; every other key is read, checked (HF_FIXED_VALUES) or refused by name.
HF_HARMLESS_KEYS = {
    "architectures": "the reference's class name; model_type says the same",
    "transformers_version": "the library that wrote the file; checked to be 4.57.x or 5.x (hf_format_of)",
    "torch_dtype": "the dtype the tensors were saved in (4.57's name); the safetensors files carry their own",
    "dtype": "the same (5.x's name)",
    "_name_or_path": "where the reference loaded the file from",
    "use_cache": "the reference's switch of its KV cache; sample.py always caches",
    "initializer_range": "the std of freshly initialised weights (init_weights(std=)); loaded weights replace them",
    "bos_token_id": "a generation setting (the tokenizer and generation_config.json hold the token ids)",
    "eos_token_id": "a generation setting (the tokenizer and generation_config.json hold the token ids)",
    "pad_token_id": "a generation setting (the tokenizer and generation_config.json hold the token ids)",
    "output_router_logits": "the reference's switch of the MoE auxiliary loss; here forward(aux_loss=True)",
    "norm_topk_prob": "both generations of the reference renormalise the top-k routing weights whatever it says",
    "sliding_window": "5.x writes null for the MoE text model; Qwen3-VL has no sliding-window attention",
    "output_attentions": "an output switch of the reference's forward",
    "output_hidden_states": "an output switch of the reference's forward",
    "return_dict": "an output switch of the reference's forward",
    "use_return_dict": "an output switch of the reference's forward",
}


def hf_format_of(d, where="config.json"):
    """
    The format generation ("v4" or "v5") that a config.json's transformers_version says wrote it, or None when the
    file does not say. A version that cannot hold Qwen3-VL (before 4.57, from 6 on) is refused: its keys are unknown.
    """
    version = d.get("transformers_version")
    if version is None:
        return None
    m = re.match(r"(\d+)\.(\d+)", str(version))
    major_minor = (int(m.group(1)), int(m.group(2))) if m else None
    if major_minor is None or not (4, 57) <= major_minor < (6, 0):
        raise ValueError(f"{where}: transformers_version is {version!r}; the config.json formats read here are "
                         f"transformers 4.57.x (Qwen3-VL's first) and 5.x")
    return "v4" if major_minor[0] == 4 else "v5"


def _read_text_rope(text, where):
    """Fold the text RoPE keys of either generation into TextConfig's fields, in place: 4.57's rope_theta +
    rope_scaling {rope_type, mrope_section, mrope_interleaved}, or 5.x's rope_parameters with all four
    (mrope_interleaved true / false: mrope_layout "interleaved" / "chunked"); a rope_type other than "default" and
    its keys (ROPE_SCALING_KEYS) become TextConfig.rope_scaling."""
    legacy, params = text.pop("rope_scaling", None), text.pop("rope_parameters", None)
    if legacy is not None and params is not None:
        raise ValueError(f"{where}: text_config holds both rope_scaling (transformers 4.57) and rope_parameters "
                         "(5.x); expected one of them")
    name = "text_config.rope_parameters" if params is not None else "text_config.rope_scaling"
    if not isinstance(params or legacy or {}, dict):
        raise TypeError(f"{where}: {name}={params or legacy!r}: must be a JSON object")
    rope = dict(params or legacy or {})
    if "rope_theta" in text:
        theta = text.pop("rope_theta")
        if rope.setdefault("rope_theta", theta) != theta:
            raise ValueError(f"{where}: text_config.rope_theta ({theta}) and {name}.rope_theta "
                             f"({rope['rope_theta']}) disagree")
    if "rope_theta" not in rope:   # 4.57 would default to 5e6, 5.x to 5e5: not guessed
        raise ValueError(f"{where}: text_config has no rope_theta (in rope_parameters for 5.x); the reference's "
                         "default differs between versions, so the file must say it")
    rope_type = rope.pop("rope_type", "default")
    for key in ("rope_theta", "mrope_section"):
        if key in rope:
            text[key] = rope.pop(key)
    if "mrope_interleaved" in rope:                  # true / false: Qwen3-VL's layout / Qwen2-VL's chunked one
        interleaved = rope.pop("mrope_interleaved")
        if not isinstance(interleaved, bool):
            raise TypeError(f"{where}: {name}.mrope_interleaved={interleaved!r}: must be true or false")
        text["mrope_layout"] = "interleaved" if interleaved else "chunked"
    if rope_type != "default":                           # checked with TextConfig (_check_rope_scaling)
        text["rope_scaling"] = {"rope_type": rope_type, **rope}
    elif rope:
        raise ValueError(f"{where}: unknown {name} key(s) {sorted(rope)}; known: rope_type, rope_theta, "
                         "mrope_section, mrope_interleaved (and with a rope_type other than 'default', its own)")


def _read_ablations(d, text, where):
    """The top-level "ablations" object that our own checkpoints write (to_hf_dict(ablations=True)): pops it from
    `d`, puts text.mrope_layout into `text` and returns the top-level switches {field: value}. The layout it names
    must agree with mrope_interleaved (already read as text's mrope_layout): false for "chunked", true otherwise."""
    switches = d.pop("ablations", {})
    if not isinstance(switches, dict):
        raise TypeError(f"{where}: ablations={switches!r}: must be a JSON object")
    unknown = sorted(set(switches) - set(ABLATIONS))
    if unknown:
        raise ValueError(f"{where}: unknown ablations key(s) {unknown}; known: {sorted(ABLATIONS)}")
    top = {}
    for key, value in switches.items():
        if key == "text.mrope_layout":
            read = text.get("mrope_layout", "interleaved")
            if (value == "chunked") != (read == "chunked"):
                raise ValueError(f"{where}: ablations says text.mrope_layout={value!r}, but the RoPE settings' "
                                 f"mrope_interleaved is {read != 'chunked'}")
            text["mrope_layout"] = value
        else:
            top[key] = value
    return top


# Fields that --arch cannot set: the tokenizer a run uses decides them.
ARCH_FIXED = ("text.vocab_size", "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def parse_arch(spec):
    """
    train.py's --arch "KEY=VALUE[,KEY=VALUE...]" -> overrides for Qwen3VLConfig.from_preset: {field: value,
    "text": {...}, "vision": {...}}. KEY is a field of Qwen3VLConfig, or text.<field> / vision.<field>; VALUE is
    parsed by the field's type, strictly: true / false for a bool, a whole number for an int, a finite number for a
    float, the text itself for a string (the config checks it against its allowed values). ValueError naming the
    key for an unknown key, a list field, a field set by the tokenizer (ARCH_FIXED), a key given twice or a value
    of the wrong kind.
    """
    out = {}
    for item in (spec.split(",") if spec else []):
        key, eq, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not eq or not key:
            raise ValueError(f"{item!r}: must be KEY=VALUE")
        *section, name = key.split(".")
        classes = {(): Qwen3VLConfig, ("text",): TextConfig, ("vision",): VisionConfig}
        cls = classes.get(tuple(section))
        kinds = {f.name: f.type for f in fields(cls)} if cls else {}
        if name not in kinds or kinds[name] in (TextConfig, VisionConfig):
            raise ValueError(f"unknown key {key!r}; keys are fields of Qwen3VLConfig, text.<field> (TextConfig) or "
                             "vision.<field> (VisionConfig)")
        if key in ARCH_FIXED:
            raise ValueError(f"{key}: set by the run's tokenizer, not by --arch")
        kind = kinds[name]
        if kind is bool and text in ("true", "false"):
            value = text == "true"
        elif kind is int and re.fullmatch(r"-?\d+", text):
            value = int(text)
        elif kind is float and re.fullmatch(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text):
            value = float(text)
        elif kind is str and text:
            value = text
        else:
            allowed = {bool: "true or false", int: "a whole number", float: "a number", str: "a word"}.get(kind)
            raise ValueError(f"{key}={text!r}: must be {allowed}" if allowed else
                             f"{key}: a {kind.__name__} field, which --arch does not set")
        target = out.setdefault(section[0], {}) if section else out
        if name in target:
            raise ValueError(f"{key}: given twice")
        target[name] = value
    return out


def flat_arch(overrides):
    """parse_arch's nested overrides as {dotted key: value}."""
    return {f"{k}.{kk}" if isinstance(v, dict) else k: vv for k, v in overrides.items()
            for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)])}


def get_field(cfg, key):
    """A config field by its dotted name ("deepstack", "text.mrope_layout")."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _checked(cls, d, where, skip=()):
    """Refuse keys the dataclass does not know: a typo must never be silently ignored."""
    known = {f.name for f in fields(cls)} - set(skip)
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {where} key(s) {unknown}; known: {sorted(known)}")
    return d


def _build(cls, d, where):
    return cls(**_checked(cls, d, where))


def trained_tokenizer_ids(vocab_size):
    """The special-token ids of a tokenizer trained here (Tokenizer.train) with exactly `vocab_size` ids: its special
    tokens are the last ids, in tokenizer.SPECIAL_TOKENS order."""
    from tokenizer import SPECIAL_TOKENS
    first = vocab_size - len(SPECIAL_TOKENS)
    return dict(image_token_id=first + SPECIAL_TOKENS.index("<|image_pad|>"),
                video_token_id=first + SPECIAL_TOKENS.index("<|video_pad|>"),
                vision_start_token_id=first + SPECIAL_TOKENS.index("<|vision_start|>"),
                vision_end_token_id=first + SPECIAL_TOKENS.index("<|vision_end|>"))


_VIT_SMALL = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, deepstack_visual_indexes=[5, 11, 17])
_VIT_LARGE = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, deepstack_visual_indexes=[8, 16, 24])
PRESETS = {
    "qwen3-vl-2b": dict(tie_word_embeddings=True, vision=dict(_VIT_SMALL, out_hidden_size=2048),
                        text=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                  num_attention_heads=16, num_key_value_heads=8)),
    "qwen3-vl-4b": dict(tie_word_embeddings=True, vision=dict(_VIT_SMALL, out_hidden_size=2560),
                        text=dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                  num_attention_heads=32, num_key_value_heads=8)),
    "qwen3-vl-8b": dict(vision=dict(_VIT_LARGE, out_hidden_size=4096),
                        text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                  num_attention_heads=32, num_key_value_heads=8)),
    "qwen3-vl-32b": dict(vision=dict(_VIT_LARGE, out_hidden_size=5120),
                         text=dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                                   num_attention_heads=64, num_key_value_heads=8)),
    # mixture of experts (moe.py): every layer sparse, 128 experts, 8 per token; intermediate_size is unused
    "qwen3-vl-30b-a3b": dict(vision=dict(_VIT_LARGE, out_hidden_size=2048),
                             text=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                                       num_attention_heads=32, num_key_value_heads=4, num_experts=128,
                                       num_experts_per_tok=8, moe_intermediate_size=768)),
    "qwen3-vl-235b-a22b": dict(vision=dict(_VIT_LARGE, out_hidden_size=4096),
                               text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=94,
                                         num_attention_heads=64, num_key_value_heads=4, num_experts=128,
                                         num_experts_per_tok=8, moe_intermediate_size=1536)),
    # toy sizes: same architecture, trains on a laptop CPU in minutes (toy-cpu) or on one GPU in an hour (toy-gpu);
    # vocab_size and the special token ids come from the tokenizer trained for the run
    "toy-cpu": dict(tie_word_embeddings=True,
                    vision=dict(depth=4, hidden_size=128, intermediate_size=384, num_heads=4,
                                num_position_embeddings=64, out_hidden_size=192, deepstack_visual_indexes=[1, 2]),
                    text=dict(vocab_size=2048, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                              num_attention_heads=6, num_key_value_heads=2, head_dim=32, mrope_section=[8, 4, 4],
                              max_position_embeddings=4096, rope_theta=10000.0)),
    "toy-gpu": dict(tie_word_embeddings=True,
                    vision=dict(depth=12, hidden_size=768, intermediate_size=3072, num_heads=12,
                                out_hidden_size=1024, deepstack_visual_indexes=[3, 7, 11]),
                    text=dict(vocab_size=8192, hidden_size=1024, intermediate_size=3072, num_hidden_layers=16,
                              num_attention_heads=16, num_key_value_heads=4, head_dim=64, mrope_section=[12, 10, 10],
                              max_position_embeddings=16384)),
}


# ----------------------------------------------------------------------------------------------------------
# Checkpoint files


def read_json(path):
    """The JSON object in a file; ValueError naming the file if it holds invalid JSON or something else."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{os.fspath(path)!r} is not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{os.fspath(path)!r} must hold a JSON object, got {type(obj).__name__}")
    return obj


def read_hf_config(path):
    """The Qwen3VLConfig of a Hugging Face checkpoint directory's config.json; FileNotFoundError without one,
    ValueError / TypeError (naming the directory and the field) for one that this implementation cannot run."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{os.fspath(path)!r} is not a Qwen3-VL checkpoint directory: no config.json")
    return Qwen3VLConfig.from_hf_dict(read_json(cfg_file), where=cfg_file)


def checkpoint_files(path):
    """
    The safetensors files of a checkpoint directory: one model.safetensors or the shards of an index. An index
    may name only plain file names: a shard elsewhere ('../x.safetensors', '/abs/x.safetensors', 'sub/x') is refused
    (ValueError), so the files read are always those inside the directory. Missing files: FileNotFoundError.
    """
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index!r}: weight_map must be a non-empty JSON object {{tensor name: shard file}}")
        names = sorted(set(weight_map.values()), key=str)
        for name in names:
            if not (isinstance(name, str) and name.endswith(".safetensors") and os.path.basename(name) == name):
                raise ValueError(f"{index!r}: shard {name!r}: must be a plain *.safetensors file name inside the "
                                 "checkpoint directory")
        files = [os.path.join(path, n) for n in names]
        for file in files:
            if not os.path.isfile(file):
                raise FileNotFoundError(f"checkpoint shard {file!r} listed in the index is missing")
        return files
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return [os.path.join(path, "model.safetensors")]
    pickled = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
    hint = f" (found {pickled}: pickle files are never loaded; convert them to safetensors)" if pickled else ""
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {os.fspath(path)!r}{hint}")


# The whole key table: our module tree mirrors the checkpoint's below these prefixes.
HF_PREFIXES = [("model.visual.", "visual."), ("model.language_model.", "language_model."), ("lm_head.", "lm_head.")]
PATCH_EMBED = "visual.patch_embed.proj.weight"      # the one tensor whose layout differs (Conv3d vs Linear)


def hf_to_ours(key):
    for hf, ours in HF_PREFIXES:
        if key.startswith(hf):
            return ours + key[len(hf):]
    return key


def ours_to_hf(name):
    for hf, ours in HF_PREFIXES:
        if name.startswith(ours):
            return hf + name[len(ours):]
    raise KeyError(name)


def write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def atomic_write(path, write):
    """write(tmp) then rename over path: a crash mid-write never leaves a truncated file at `path`."""
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)
