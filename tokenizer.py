"""
The Qwen tokenizer (byte-level BPE on tiktoken) and the Qwen3-VL chat template (reference §1.3, §5.3).

Notable features
- One vocabulary for Qwen, Qwen2, Qwen2.5, Qwen3 and Qwen3-VL: 151,643 byte-level BPE ranks. Text is
  NFC-normalised (like the Hugging Face `Qwen2TokenizerFast`), split by the Qwen2 regex (a number is split
  into single digits, a word keeps at most one leading space), then each piece is merged by tiktoken.
- 26 special tokens right after the ranks: `<|endoftext|>` = 151643 ... `</think>` = 151668. A tokenizer trained
  here for a toy model gets the same 26 tokens right after its own ranks (so with other ids: use the attributes
  `tok.im_start_id`, `tok.image_token_id`, ...).
- `Tokenizer.from_pretrained`: a tiktoken ranks file (default `data/qwen.tiktoken`, see data/get_tokenizer.py) or
  a Hugging Face checkpoint directory (`tokenizer.json`, or `vocab.json` + `merges.txt`).
- `Tokenizer.train`: a small byte-level BPE trainer (pair counts updated incrementally, a lazy max-heap).
- Chat templates: a checkpoint's own Jinja template (chat_template.jinja, chat_template.json or tokenizer_config.json)
  formats its prompts, rendered as the Hugging Face stack renders it; without one, the Qwen3-VL Instruct or Thinking
  template written out in Python (`render_chat`). Either way with the mask of the assistant tokens that SFT trains on.
  The Python template writes the only special tokens: `<|im_start|>` typed inside a message is plain text there
  (a Jinja template's text is tokenized as Hugging Face does, special-token strings included).
"""
import base64
import datetime
import functools
import heapq
import importlib.util
import json
import os
import re
import unicodedata
from collections import Counter, defaultdict

import jinja2
import jinja2.ext
import jinja2.sandbox
import regex  # installed with tiktoken (its own dependency); the trainer splits text with it exactly like tiktoken
import tiktoken

# The pre-tokenizer of Qwen2/Qwen3 (the "Split" regex of their tokenizer.json). Alternatives, in order:
# English contractions | an optional non-letter then letters | ONE digit | an optional space then punctuation
# (and the newlines after it) | whitespace ending in newlines | whitespace not followed by a non-space | whitespace.
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Qwen3-VL's added tokens, in id order from len(ranks) = 151643 (reference §1.3).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",                           # 151643-151645
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",                                          # 151646-151651
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",                     # 151652-151654
    "<|image_pad|>", "<|video_pad|>",                                          # 151655-151656
    "<tool_call>", "</tool_call>",                                             # 151657-151658
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>",                                     # 151665-151666
    "<think>", "</think>",                                                     # 151667-151668
]
# The first 14 are "special" in Hugging Face's sense (dropped by decode(skip_special_tokens=True)); the rest are
# ordinary added tokens that the model writes as part of its answers.
CONTROL_TOKENS = SPECIAL_TOKENS[:14]
# Added tokens that may appear inside an assistant message's own text (the model emits them): parsed there.
ASSISTANT_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]

SURROGATE = re.compile("[\ud800-\udfff]")

DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "qwen.tiktoken")

# The fixed text that the template writes into the system turn when tools are given.
TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n")


def default_ranks_path():
    """data/qwen.tiktoken, else the same file inside the installed dashscope package (found without importing it;
    data/get_tokenizer.py copies it from there and checks it)."""
    if os.path.exists(DEFAULT_PATH):
        return DEFAULT_PATH
    spec = importlib.util.find_spec("dashscope")
    return os.path.join(spec.submodule_search_locations[0], "resources", "qwen.tiktoken") if spec else DEFAULT_PATH


def bytes_to_unicode():
    """
    GPT-2's byte -> character table, used by every Hugging Face byte-level BPE file (vocab.json, merges.txt,
    tokenizer.json) to write token bytes as printable text: the 188 printable Latin-1 bytes stand for themselves,
    the other 68 bytes become U+0100, U+0101, ... in byte order (so a space is "Ġ", a newline "Ċ").
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def read_tiktoken_file(path):
    """A tiktoken ranks file: one line `base64(token bytes) rank` per token; ValueError naming a line that is not."""
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError:                     # wrong field count, bad base64 (binascii.Error), bad rank
                    raise ValueError(f"{os.fspath(path)} line {n}: must be 'base64(token bytes) rank', got "
                                     f"{line[:60]!r}") from None
    return ranks


def ranks_from_hf_bpe(vocab, merges):
    """
    HF byte-level BPE (vocab {token text: id}, merges [(left, right)]) -> tiktoken ranks {token bytes: id}.
    tiktoken merges the adjacent pair whose merged bytes have the lowest id; HF applies the merge that comes first
    in `merges`. The two agree when each merge makes a token with a higher id than the merge before it, as in
    every Qwen checkpoint; anything else is refused.
    """
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes(to_byte[c] for c in token): i for token, i in vocab.items()}
    last = -1
    for left, right in merges:
        i = vocab[left + right]
        if i <= last:
            raise ValueError(f"merge ({left!r}, {right!r}) makes id {i} after a merge that made id {last}: the merge "
                             "order does not follow the ids, so tiktoken cannot reproduce this BPE")
        last = i
    return ranks


def bpe_merge(ranks, token):
    """
    The last merge that makes `token` in byte-level BPE ranks {token bytes: id} -> (left, right): its bytes merged
    as tiktoken merges them, with only the ranks below its own, until two parts are left. (The Hugging Face files
    list merges; tiktoken keeps only the ranks. Merges listed in rank order rebuild tiktoken's encoding.)
    """
    rank, parts = ranks[token], [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, i = min((ranks.get(parts[j] + parts[j + 1], rank), j) for j in range(len(parts) - 1))
        if best >= rank:
            raise ValueError(f"token {token!r} (id {rank}) cannot be built from tokens of lower ids: not a BPE "
                             "vocabulary")
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


class Tokenizer:
    """Byte-level BPE tokenizer with Qwen3-VL's special tokens and chat template."""

    def __init__(self, ranks, special_tokens=None, pattern=QWEN_PATTERN, normalize=True, name="qwen",
                 chat_template=None, chat_template_file="chat_template", thinking=False):
        """
        ranks: {token bytes: id} with ids 0..len-1. special_tokens: {token text: id}; by default SPECIAL_TOKENS at
        len(ranks), len(ranks)+1, ... normalize: NFC-normalise text before tokenizing (as the HF tokenizer does).
        chat_template: a Jinja chat template (a checkpoint's own; `chat_template_file` names it in errors), or None
        for the Python template (render_chat) in its Instruct flavour, or its Thinking flavour with thinking=True.
        """
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError("BPE ranks must be the ids 0..n-1, each once")
        if special_tokens is None:
            special_tokens = {t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)}
        required = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|image_pad|>", "<|video_pad|>"]
        missing = [t for t in required if t not in special_tokens]
        if missing:
            raise ValueError(f"the tokenizer lacks the special tokens {missing}")
        self.ranks, self.special, self.pattern, self.normalize = ranks, dict(special_tokens), pattern, normalize
        self.enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens=self.special)
        self.n_vocab = max([len(ranks) - 1, *self.special.values()]) + 1      # number of token ids
        self.id_to_special = {i: t for t, i in self.special.items()}
        self.endoftext_id = self.pad_id = self.special["<|endoftext|>"]
        self.im_start_id, self.im_end_id = self.special["<|im_start|>"], self.special["<|im_end|>"]
        self.vision_start_id, self.vision_end_id = self.special["<|vision_start|>"], self.special["<|vision_end|>"]
        self.image_token_id, self.video_token_id = self.special["<|image_pad|>"], self.special["<|video_pad|>"]
        self.eos_ids = [self.im_end_id, self.endoftext_id]                # generation_config.json: [151645, 151643]
        self.control_ids = {self.special[t] for t in CONTROL_TOKENS if t in self.special}
        self.special_re = re.compile("|".join(re.escape(t) for t in sorted(self.special, key=len, reverse=True)))
        self.chat_template, self.chat_template_file, self.thinking = chat_template, chat_template_file, thinking
        self._generation_prompt = (None, None)           # (template, its generation prompt), computed once
        self.assistant_re = re.compile("|".join([re.escape(t) for t in ASSISTANT_TOKENS if t in self.special])
                                       or "(?!)")                        # (?!) never matches

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path=None):
        """
        path: a tiktoken ranks file (default data/qwen.tiktoken); or a checkpoint directory with one of
        tokenizer.tiktoken (ours, written by `save`), tokenizer.json (Hugging Face), or vocab.json + merges.txt
        (+ added_tokens.json / tokenizer_config.json; the older Hugging Face files), and the directory's chat
        template if it has one (read_chat_template).
        """
        path = default_ranks_path() if path is None else os.fspath(path)
        if not os.path.exists(path):
            hint = " (run `python data/get_tokenizer.py`)" if path == DEFAULT_PATH else ""
            raise FileNotFoundError(f"no tokenizer at {path}{hint}")
        if not os.path.isdir(path):
            return cls(read_tiktoken_file(path))
        tok = cls._from_directory(path)
        tok.chat_template, tok.chat_template_file = read_chat_template(path)
        return tok

    @classmethod
    def _from_directory(cls, path):
        if os.path.exists(os.path.join(path, "tokenizer.tiktoken")):
            return cls(read_tiktoken_file(os.path.join(path, "tokenizer.tiktoken")))
        if os.path.exists(os.path.join(path, "tokenizer.json")):
            with open(os.path.join(path, "tokenizer.json"), encoding="utf-8") as f:
                spec = json.load(f)
            model, pre = spec["model"], spec.get("pre_tokenizer") or {}
            steps = pre.get("pretokenizers", [pre])                     # a Sequence of steps, or a single step
            splits = [s["pattern"]["Regex"] for s in steps if s.get("type") == "Split" and "Regex" in s["pattern"]]
            normalizer = (spec.get("normalizer") or {}).get("type")
            if model.get("type") != "BPE" or not splits or normalizer not in (None, "NFC"):
                raise ValueError(f"{path}/tokenizer.json is not a Qwen-style tokenizer (byte-level BPE after a regex "
                                 f"split, NFC or no normaliser): model {model.get('type')}, normaliser {normalizer}")
            merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
            ranks = ranks_from_hf_bpe(model["vocab"], merges)
            special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
            pattern, normalize = splits[0], normalizer == "NFC"
        elif os.path.exists(os.path.join(path, "vocab.json")):
            with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
                vocab = json.load(f)
            with open(os.path.join(path, "merges.txt"), encoding="utf-8") as f:
                merges = [line.split() for line in f if line.strip() and not line.startswith("#version")]
            ranks = ranks_from_hf_bpe(vocab, merges)
            special, pattern, normalize = cls._hf_added_tokens(path), QWEN_PATTERN, True   # Qwen2Tokenizer's
        else:
            raise FileNotFoundError(f"{path} has no tokenizer.tiktoken, tokenizer.json or vocab.json + merges.txt")
        # A BPE vocab can also list its added tokens; they are not merge ranks.
        added_ids = set(special.values())
        ranks = {b: i for b, i in ranks.items() if i not in added_ids}
        return cls(ranks, special or None, pattern=pattern, normalize=normalize)

    @staticmethod
    def _hf_added_tokens(path):
        """Added tokens of a slow-format checkpoint: added_tokens.json, else tokenizer_config.json."""
        if os.path.exists(os.path.join(path, "added_tokens.json")):
            with open(os.path.join(path, "added_tokens.json"), encoding="utf-8") as f:
                return json.load(f)
        if os.path.exists(os.path.join(path, "tokenizer_config.json")):
            with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
                decoder = json.load(f).get("added_tokens_decoder", {})
            return {t["content"]: int(i) for i, t in decoder.items()}
        return {}

    def save(self, path):
        """
        Write the ranks as a tiktoken file (in a checkpoint: <dir>/tokenizer.tiktoken); the special tokens follow
        from the ranks (SPECIAL_TOKENS right after them).
        """
        if self.special != {t: len(self.ranks) + i for i, t in enumerate(SPECIAL_TOKENS)}:
            raise ValueError("only tokenizers with the default special-token layout can be saved as a ranks file")
        with open(path, "wb") as f:
            for token, rank in sorted(self.ranks.items(), key=lambda kv: kv[1]):
                f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")

    def save_hf(self, path):
        """
        The Hugging Face files of this tokenizer in directory `path`: tokenizer.json (byte-level BPE: the ranks as
        the vocabulary, the merges that rebuild them, the split regex, NFC, the added tokens), tokenizer_config.json
        and, if the tokenizer has a checkpoint's chat template, chat_template.jinja. transformers' AutoTokenizer
        loads the directory and gives the same ids, and so does Tokenizer.from_pretrained.
        """
        os.makedirs(path, exist_ok=True)
        b2u = bytes_to_unicode()

        def text(token):
            return "".join(b2u[b] for b in token)

        by_rank = sorted(self.ranks.items(), key=lambda kv: kv[1])
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                  "special": t in CONTROL_TOKENS} for t, i in sorted(self.special.items(), key=lambda kv: kv[1])]
        spec = {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": "NFC"} if self.normalize else None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False},
                byte_level]},
            "post_processor": byte_level, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {text(token): i for token, i in by_rank},
                      "merges": [[text(a), text(b)] for a, b in (bpe_merge(self.ranks, token) for token, _ in by_rank
                                                                 if len(token) > 1)]},
        }
        config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "unk_token": None,
                  "eos_token": self.id_to_special[self.im_end_id], "pad_token": self.id_to_special[self.pad_id],
                  "add_prefix_space": False, "clean_up_tokenization_spaces": False, "errors": "replace",
                  "split_special_tokens": False,
                  "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added}}
        with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(spec, f, ensure_ascii=False)
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)
        if self.chat_template is not None:
            with open(os.path.join(path, "chat_template.jinja"), "w", encoding="utf-8") as f:
                f.write(self.chat_template)

    # ------------------------------------------------------------------------------------------------ training
    @classmethod
    def train(cls, texts, vocab_size, verbose=False):
        """
        Byte-level BPE on `texts` (an iterable of str) for a toy model. vocab_size counts everything: 256 bytes +
        merges + the 26 special tokens (fewer merges if the text runs out of pairs; read `tok.n_vocab`).

        Same recipe as the real vocabulary: NFC, split with QWEN_PATTERN (merges never cross a piece boundary),
        then repeatedly merge the most frequent adjacent pair of tokens into a new token. Each distinct piece is
        stored once with its count; after a merge, only the pieces that held the pair are updated, and the most
        frequent pair is found with a max-heap whose outdated entries are skipped when popped.
        """
        n_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
        if n_merges < 0:
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")
        split = regex.compile(QWEN_PATTERN)
        pieces = Counter()
        for text in texts:
            pieces.update(split.findall(unicodedata.normalize("NFC", text)))
        words = [list(p.encode("utf-8")) for p in pieces]                 # each distinct piece as token ids
        freqs = list(pieces.values())
        pair_count, pair_words = defaultdict(int), defaultdict(set)       # pair -> count, pair -> word indices
        for wi, w in enumerate(words):
            for pair in zip(w, w[1:]):
                pair_count[pair] += freqs[wi]
                pair_words[pair].add(wi)
        heap = [(-c, pair) for pair, c in pair_count.items()]               # ties: the smaller pair of ids first
        heapq.heapify(heap)
        token_bytes = [bytes([b]) for b in range(256)]
        ranks = {t: i for i, t in enumerate(token_bytes)}
        while len(token_bytes) < 256 + n_merges and heap:
            neg_count, pair = heapq.heappop(heap)
            if -neg_count != pair_count[pair] or neg_count == 0:
                continue                                                    # outdated heap entry
            merged = token_bytes[pair[0]] + token_bytes[pair[1]]
            new_id = ranks.get(merged)                                      # the same bytes may exist already
            if new_id is None:
                new_id = ranks[merged] = len(token_bytes)
                token_bytes.append(merged)
            changed = set()
            for wi in pair_words.pop(pair):
                w, f = words[wi], freqs[wi]
                for p in zip(w, w[1:]):                                     # take the word's pairs out ...
                    pair_count[p] -= f
                    changed.add(p)
                out, i = [], 0                                              # ... merge left to right ...
                while i < len(w):
                    if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
                        out.append(new_id)
                        i += 2
                    else:
                        out.append(w[i])
                        i += 1
                words[wi] = out
                for p in zip(out, out[1:]):                                 # ... and put its new pairs back
                    pair_count[p] += f
                    pair_words[p].add(wi)
                    changed.add(p)
            for p in changed:
                if pair_count[p] > 0:
                    heapq.heappush(heap, (-pair_count[p], p))
            if verbose and len(token_bytes) % 500 == 0:
                print(f"merge {len(token_bytes) - 256}: {merged!r} ({-neg_count} times)")
        return cls(ranks)

    # ------------------------------------------------------------------------------------------------ encode
    def encode(self, text, allowed_special=False):
        """text -> ids. Special-token strings in `text` are ordinary text unless allowed_special=True."""
        if allowed_special:
            return self.encode_pieces([(p, False) for p in self.split_special(text, self.special_re)])[0]
        return self.enc.encode_ordinary(self._normalize(text))

    def encode_batch(self, texts):
        """Several texts at once (tiktoken uses threads); special-token strings are ordinary text."""
        return self.enc.encode_ordinary_batch([self._normalize(t) for t in texts])

    def decode(self, ids, skip_special_tokens=False):
        """ids -> text; invalid UTF-8 (a token sequence cut inside a character) becomes U+FFFD. Ids past the vocabulary
        (a model's embedding is padded beyond it, e.g. 151936 rows for 151669 tokens) decode to nothing, as in the
        Hugging Face tokenizer."""
        ids = [i for i in map(int, ids) if 0 <= i < self.n_vocab]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.control_ids]
        return self.enc.decode(ids, errors="replace")

    def id_to_token(self, i):
        """One token as text, for debugging (bytes that are not valid UTF-8 alone show as U+FFFD)."""
        return self.id_to_special.get(i) or self.enc.decode_single_token_bytes(i).decode("utf-8", errors="replace")

    def _normalize(self, text):
        """The text the BPE sees: UTF-16 surrogates (a str from JSON or Windows may hold them) paired into their
        character and lone ones made U+FFFD, as tiktoken would do inside encode_ordinary; done here so that the
        assistant mask, which counts UTF-8 bytes, sees the same text. Then NFC if `normalize`."""
        if SURROGATE.search(text):
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return unicodedata.normalize("NFC", text) if self.normalize else text

    def split_special(self, text, pattern):
        """'a<|im_end|>b' -> ['a', 151645, 'b']: the special tokens matched by `pattern` become ids."""
        out, pos = [], 0
        for m in pattern.finditer(text):
            out += [text[pos:m.start()], self.special[m.group()]]
            pos = m.end()
        return [p for p in out + [text[pos:]] if p != ""]

    def encode_pieces(self, pieces):
        """
        pieces: [(str | token id, trainable)] -> (ids, mask). Consecutive strings are joined and tokenized as one
        text, exactly as a tokenizer sees the rendered chat template (BPE pieces can cross from one message part
        into the next, e.g. a newline in the template and a newline that starts the assistant's answer). A token
        is trainable when any of its bytes comes from a trainable piece.
        """
        ids, mask, run = [], [], []

        def flush():
            if not run:
                return
            parts = []                                                      # (text, trainable), flags alternating
            for text, train in run:
                if parts and parts[-1][1] == train:
                    parts[-1] = (parts[-1][0] + text, train)
                else:
                    parts.append((text, train))
            # NFC part by part equals NFC of the whole: the flag only changes after the "assistant\n" header,
            # and NFC never composes a character with a newline.
            parts = [(self._normalize(text), train) for text, train in parts]
            tokens = self.enc.encode_ordinary("".join(text for text, _ in parts))
            ids.extend(tokens)
            if len(parts) == 1:
                mask.extend([parts[0][1]] * len(tokens))
            else:
                flags = b"".join(bytes([train]) * len(text.encode("utf-8")) for text, train in parts)
                pos = 0
                for token in self.enc.decode_tokens_bytes(tokens):
                    mask.append(any(flags[pos:pos + len(token)]))
                    pos += len(token)
            run.clear()

        for piece, train in pieces:
            if isinstance(piece, str):
                run.append((piece, train))
            else:
                flush()
                ids.append(piece)
                mask.append(train)
        flush()
        return ids, mask

    # ------------------------------------------------------------------------------------------------ chat
    def apply_chat_template(self, messages, add_generation_prompt=False, return_assistant_mask=False,
                            add_vision_id=False, tools=None, tokenize=True, vision=None, thinking=None,
                            **template_kwargs):
        """
        Render `messages` with the checkpoint's chat template (self.chat_template, Jinja), or without one with the
        Python template (render_chat: Qwen3-VL Instruct, or Thinking with thinking=True / self.thinking), then
        tokenize.

        messages: [{"role": "system"|"user"|"assistant"|"tool", "content": str | [item, ...],
                    "tool_calls": [...], "reasoning_content": str (assistant, optional)}],
                  item = {"type": "text", "text": ...} | {"type": "image", "image": ...} | {"type": "video", ...}.
        add_vision_id: write "Picture n: " / "Video n: " before each image / video.
        tools: list of JSON-schema dicts, listed in the system turn.
        vision: optional callable(item, kind) -> pieces (str or token id) that replace an image's / video's
                `<|vision_start|><|image_pad|><|vision_end|>` (the Processor's expansion to the real token count).
        template_kwargs: more variables for a Jinja template (e.g. enable_thinking of some templates).
        Returns ids, or (ids, mask) with return_assistant_mask, or the text with tokenize=False.

        The mask marks what the model must learn to write: each assistant turn after what the template's
        generation prompt writes ("<|im_start|>assistant\\n", and "<think>\\n" for Thinking models) through its
        closing <|im_end|>: content, reasoning, tool calls. Not the "\\n" after <|im_end|>: generation stops at
        <|im_end|>, so that newline is never sampled.

        Messages that are not dicts, content that is not a string / list / None, text that is not a string,
        malformed tool calls or tools that JSON cannot write raise TypeError. Lone UTF-16 surrogates become U+FFFD
        in every turn.
        """
        if self.chat_template is not None:
            if thinking is not None:
                raise ValueError(f"thinking= picks the flavour of the Python template; this tokenizer formats chats "
                                 f"with its checkpoint's template ({self.chat_template_file})")
            text = self.render_template(messages, add_generation_prompt, add_vision_id=add_vision_id, tools=tools,
                                        **template_kwargs)
            pieces = self.template_pieces(text, messages, vision, mask=return_assistant_mask)
        else:
            if template_kwargs:
                raise ValueError(f"the Python chat template takes no {sorted(template_kwargs)} (only a checkpoint's "
                                 "Jinja template reads extra variables)")
            thinking = self.thinking if thinking is None else thinking
            pieces = self.render_chat(messages, add_generation_prompt, add_vision_id, tools, vision, thinking)
        if not tokenize:
            return "".join(p if isinstance(p, str) else self.id_to_special[p] for p, _ in pieces)
        ids, mask = self.encode_pieces(pieces)
        return (ids, mask) if return_assistant_mask else ids

    # -- a checkpoint's Jinja template, rendered as the Hugging Face stack renders it

    def render_template(self, messages, add_generation_prompt=False, **context):
        """self.chat_template rendered to text, in a sandbox with Hugging Face's settings and helpers."""
        if not messages:
            raise ValueError("no messages to render")
        try:
            return _jinja(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=None, eos_token=self.id_to_special[self.im_end_id], pad_token=self.id_to_special[self.pad_id],
                **context)
        except jinja2.TemplateError as e:
            line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
            raise ValueError(f"{self.chat_template_file}: the chat template failed to render{line}: "
                             f"{type(e).__name__}: {e}") from e
        except Exception as e:     # a template that expects other messages (a missing key, a wrong type)
            raise ValueError(f"{self.chat_template_file}: the chat template failed to render these messages: "
                             f"{type(e).__name__}: {e}") from e

    def generation_prompt(self):
        """What self.chat_template writes for add_generation_prompt=True ("<|im_start|>assistant\\n" for Qwen3-VL
        Instruct, with "<think>\\n" for Thinking)."""
        if self._generation_prompt[0] == self.chat_template:
            return self._generation_prompt[1]
        messages = [{"role": "user", "content": "?"}]
        without, with_prompt = (self.render_template(messages, flag) for flag in (False, True))
        if not with_prompt.startswith(without) or not with_prompt[len(without):].startswith(ASSISTANT_HEADER):
            raise ValueError(f"{self.chat_template_file}: the chat template's generation prompt is "
                             f"{with_prompt[len(without):]!r}; the assistant mask expects one that starts with "
                             f"{ASSISTANT_HEADER!r} (ChatML)")
        self._generation_prompt = (self.chat_template, with_prompt[len(without):])
        return self._generation_prompt[1]

    def template_pieces(self, text, messages, vision=None, mask=True):
        """
        Rendered text -> [(str | special id, trainable)]. Every special-token string becomes its token, as Hugging
        Face tokenizes a rendered template. Trainable (with mask=True): each assistant turn
        ("<|im_start|>assistant\\n" ... through <|im_end|>) after the generation prompt; the number of turns must
        equal the assistant messages. With `vision`, each image's / video's placeholder triple is replaced by
        vision(item, kind), in message order.
        """
        trainable = [False] * len(text)
        end = self.id_to_special[self.im_end_id]
        closed = 0
        for turn in re.finditer(re.escape(ASSISTANT_HEADER), text) if mask else ():
            stop = text.find(end, turn.start())
            if stop < 0:
                continue                                 # the generation prompt: nothing written yet
            opener = self.generation_prompt()
            first = turn.start() + len(opener if text.startswith(opener, turn.start()) else ASSISTANT_HEADER)
            trainable[first:stop + len(end)] = [True] * (stop + len(end) - first)
            closed += 1
        n_assistant = sum(m.get("role") == "assistant" for m in messages)
        if mask and closed != n_assistant:
            raise ValueError(f"{self.chat_template_file}: the rendered chat has {closed} assistant turns, the "
                             f"messages {n_assistant} assistant messages (does a message hold {ASSISTANT_HEADER!r}?)")
        pieces, pos = [], 0

        def add_text(a, b):                              # text[a:b], cut where the trainable flag changes
            while a < b:
                c = a
                while c < b and trainable[c] == trainable[a]:
                    c += 1
                pieces.append((text[a:c], trainable[a]))
                a = c

        for m in self.special_re.finditer(text):
            add_text(pos, m.start())
            pieces.append((self.special[m.group()], trainable[m.start()]))
            pos = m.end()
        add_text(pos, len(text))
        return self._expand_vision(pieces, messages, vision) if vision else pieces

    def _expand_vision(self, pieces, messages, vision):
        items = [(content_kind(item), item) for message in messages if isinstance(message.get("content"), list)
                 for item in message["content"] if content_kind(item) != "text"]
        pads = {self.image_token_id: "image", self.video_token_id: "video"}
        out, i, k = [], 0, 0
        while i < len(pieces):
            triple = [p for p, _ in pieces[i:i + 3]]
            if len(triple) == 3 and triple[0] == self.vision_start_id and triple[1] in pads \
                    and triple[2] == self.vision_end_id:
                kind = pads[triple[1]]
                if k >= len(items) or items[k][0] != kind:
                    raise ValueError(f"{self.chat_template_file}: the chat template wrote {kind} placeholder "
                                     f"{k + 1}, but the messages' {k + 1}th image or video is "
                                     f"{items[k][0] if k < len(items) else 'missing'}")
                out.extend((p, False) for p in vision(items[k][1], kind))
                k, i = k + 1, i + 3
            else:
                out.append(pieces[i])
                i += 1
        if k != len(items):
            raise ValueError(f"{self.chat_template_file}: the chat template wrote {k} image/video placeholders for "
                             f"the {len(items)} images and videos in the messages")
        return out

    # -- the Python template: Qwen3-VL's, for checkpoints without a Jinja template

    def render_chat(self, messages, add_generation_prompt=False, add_vision_id=False, tools=None, vision=None,
                    thinking=False):
        """
        The Qwen3-VL chat template written out in Python: messages -> [(str | special id, trainable)]. Instruct
        (thinking=False) or Thinking: the Thinking template opens the reply with "<think>\\n", writes an assistant
        turn after the last user query as "<think>\\n{reasoning}\\n</think>\\n\\n{answer}" (reasoning from
        "reasoning_content" or from the content's <think>...</think>), earlier turns without their reasoning, and
        renders system messages after the first.

        Differences from the Jinja templates, all on inputs they would silently mis-render: an image in a
        system/assistant message, an unknown role or content item, and (Instruct) a system message that is not
        first raise ValueError; content None is empty text (the templates fail).
        """
        if not isinstance(messages, (list, tuple)):
            raise TypeError(f"messages={type(messages).__name__}: must be a list of message dicts")
        if not messages:
            raise ValueError("no messages to render")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise TypeError(f"messages[{i}]={message!r}: must be a dict with 'role' and 'content'")
        out = []
        count = {"image": 0, "video": 0}

        def template(text, train=False):          # text the template writes: its special-token strings are tokens
            out.extend((p, train) for p in self.split_special(text, self.special_re))

        def plain(text):                           # message text: always plain text
            out.append((text, False))

        def answer(text):                          # assistant text: may hold the tokens the model writes
            out.extend((p, True) for p in self.split_special(text, self.assistant_re))

        def content_items(content, role):
            if content is None:
                return []
            if isinstance(content, str):
                return [("text", content)]
            if not isinstance(content, (list, tuple)):
                raise TypeError(f"{role} message content={content!r}: must be a string, a list of items or None")
            items = []
            for item in content:
                kind = content_kind(item)
                if kind != "text" and role in ("system", "assistant"):
                    article = "an" if role == "assistant" else "a"
                    raise ValueError(f"{article} {role} message can hold only text, got a {kind} "
                                     "(the Qwen3-VL template would drop it)")
                if kind == "text" and not isinstance(item["text"], str):
                    raise TypeError(f"text item {item!r}: 'text' must be a string")
                items.append((kind, item["text"] if kind == "text" else item))
            return items

        def text_of(content, role):
            return "".join(t for _, t in content_items(content, role))

        def user_content(content, role):           # user and tool messages: text, images, videos
            for kind, item in content_items(content, role):
                if kind == "text":
                    plain(item)
                    continue
                count[kind] += 1
                if add_vision_id:
                    plain(f"{'Picture' if kind == 'image' else 'Video'} {count[kind]}: ")
                pad = self.image_token_id if kind == "image" else self.video_token_id
                expanded = vision(item, kind) if vision else [self.vision_start_id, pad, self.vision_end_id]
                out.extend((p, False) for p in expanded)

        # The system turn: the first message if it is a system message, and the tool list.
        system = messages[0].get("role") == "system"
        if tools:
            template("<|im_start|>system\n")
            if system:
                plain(text_of(messages[0].get("content"), "system"))
                template("\n\n")
            template(TOOLS_HEADER)
            for tool in tools:
                template("\n")
                plain(json.dumps(tool, ensure_ascii=False))
            template(TOOLS_FOOTER)
        elif system:
            template("<|im_start|>system\n")
            plain(text_of(messages[0]["content"], "system"))
            template("<|im_end|>\n")

        # Thinking: the last user message that is a query, not tool results written as a user message
        last_query = len(messages) - 1
        for i in reversed(range(len(messages))):
            if messages[i].get("role") == "user":
                text = "".join(t if kind == "text" else "\0" for kind, t in
                               content_items(messages[i].get("content"), "user"))
                if not (text.startswith("<tool_response>") and text.endswith("</tool_response>")):
                    last_query = i
                    break

        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role == "system":
                if i > 0 and not thinking:
                    raise ValueError(f"message {i} is a system message; only the first message may be one "
                                     "(the Qwen3-VL Instruct template drops the others)")
                if i > 0:
                    template("<|im_start|>system\n")
                    plain(text_of(content, role))
                    template("<|im_end|>\n")
            elif role == "user":
                template("<|im_start|>user\n")
                user_content(content, role)
                template("<|im_end|>\n")
            elif role == "assistant":
                template(ASSISTANT_HEADER)
                text = text_of(content, role)
                if not thinking:
                    answer(text)
                else:
                    reasoning = message.get("reasoning_content")
                    if not isinstance(reasoning, str):
                        reasoning = ""
                        if "</think>" in text:
                            reasoning = text.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                            text = text.split("</think>")[-1].lstrip("\n")
                    if i > last_query and (i == len(messages) - 1 or reasoning):
                        template(THINK_OPENER)         # what the generation prompt writes: not trained on
                        answer(reasoning.strip("\n"))
                        template("\n</think>\n\n", train=True)
                        answer(text.lstrip("\n"))
                    else:
                        answer(text)
                # a newline between the text and the first tool call: Instruct looks at the message's content,
                # Thinking at the text left after the reasoning
                for j, call in enumerate(message.get("tool_calls") or []):
                    call = (call.get("function") or call) if isinstance(call, dict) else call
                    if not (isinstance(call, dict) and isinstance(call.get("name"), str) and "arguments" in call):
                        raise TypeError(f"message {i} tool_calls[{j}]={call!r}: must be a dict with 'name' (a string) "
                                        "and 'arguments'")
                    if j > 0 or (text if thinking else content):
                        template("\n", train=True)
                    args = call["arguments"]
                    template('<tool_call>\n{"name": "', train=True)
                    answer(call["name"])
                    template('", "arguments": ', train=True)
                    answer(args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))
                    template("}\n</tool_call>", train=True)
                template("<|im_end|>", train=True)
                template("\n")
            elif role == "tool":                   # consecutive tool results share one user turn
                if i == 0 or messages[i - 1].get("role") != "tool":
                    template("<|im_start|>user")
                template("\n<tool_response>\n")
                user_content(content, role)
                template("\n</tool_response>")
                if i == len(messages) - 1 or messages[i + 1].get("role") != "tool":
                    template("<|im_end|>\n")
            else:
                raise ValueError(f"message {i} has role {role!r}; expected system, user, assistant or tool")
        if add_generation_prompt:
            template(ASSISTANT_HEADER + (THINK_OPENER if thinking else ""))
        return out


ASSISTANT_HEADER = "<|im_start|>assistant\n"
THINK_OPENER = "<think>\n"                           # the Thinking template's reply opens with it


def read_chat_template(path):
    """
    (template text, its file) of a checkpoint directory, or (None, None): chat_template.jinja, else
    chat_template.json {"chat_template": ...}, else tokenizer_config.json's "chat_template" (a string, or a list of
    {"name", "template"} of which "default" is taken), in the order the Hugging Face stack reads them.
    """
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read(), jinja_file
    for name in ("chat_template.json", "tokenizer_config.json"):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        with open(file, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
        if template is None:
            continue
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
            if template is None:
                raise ValueError(f"{file}: chat_template is a list of named templates {sorted(named)} without the "
                                 "'default' one")
        if not isinstance(template, str):
            raise ValueError(f"{file}: chat_template must be a string (or a list of {{'name', 'template'}}), got "
                             f"{type(template).__name__}")
        return template, file
    return None, None


@functools.lru_cache(maxsize=8)
def _jinja(template):
    """A chat template compiled as the Hugging Face stack compiles it: a sandbox, trim_blocks and lstrip_blocks,
    {% break %} / {% continue %}, a `tojson` that keeps non-ASCII text, raise_exception() and strftime_now()."""
    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    return env.from_string(template)


def content_kind(item):
    """The template's test for a content item: image, video or text (in that order)."""
    if not isinstance(item, dict):
        raise TypeError(f"content items are dicts like {{'type': 'text', 'text': ...}}, got {item!r}")
    if item.get("type") == "image" or "image" in item or "image_url" in item:
        return "image"
    if item.get("type") == "video" or "video" in item:
        return "video"
    if "text" in item:
        return "text"
    raise ValueError(f"content item {item!r} is neither text, image nor video")
