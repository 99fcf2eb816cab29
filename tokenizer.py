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
- `apply_chat_template`: the Qwen3-VL Instruct template written out in Python, with the mask of the assistant tokens
  that SFT trains on. Only the template writes special tokens: `<|im_start|>` typed inside a message is plain text.
"""
import base64
import heapq
import importlib.util
import json
import os
import re
import unicodedata
from collections import Counter, defaultdict

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


class Tokenizer:
    """Byte-level BPE tokenizer with Qwen3-VL's special tokens and chat template."""

    def __init__(self, ranks, special_tokens=None, pattern=QWEN_PATTERN, normalize=True, name="qwen"):
        """
        ranks: {token bytes: id} with ids 0..len-1. special_tokens: {token text: id}; by default SPECIAL_TOKENS at
        len(ranks), len(ranks)+1, ... normalize: NFC-normalise text before tokenizing (as the HF tokenizer does).
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
        self.assistant_re = re.compile("|".join([re.escape(t) for t in ASSISTANT_TOKENS if t in self.special])
                                       or "(?!)")                        # (?!) never matches

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path=None):
        """
        path: a tiktoken ranks file (default data/qwen.tiktoken); or a checkpoint directory with one of
        tokenizer.tiktoken (ours, written by `save`), tokenizer.json (Hugging Face), or vocab.json + merges.txt
        (+ added_tokens.json / tokenizer_config.json; the older Hugging Face files).
        """
        path = default_ranks_path() if path is None else os.fspath(path)
        if not os.path.exists(path):
            hint = " (run `python data/get_tokenizer.py`)" if path == DEFAULT_PATH else ""
            raise FileNotFoundError(f"no tokenizer at {path}{hint}")
        if not os.path.isdir(path):
            return cls(read_tiktoken_file(path))
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
                            add_vision_id=False, tools=None, tokenize=True, vision=None):
        """
        Render `messages` with the Qwen3-VL Instruct chat template (reference §5.3), then tokenize.

        messages: [{"role": "system"|"user"|"assistant"|"tool", "content": str | [item, ...],
                    "tool_calls": [...] (assistant, optional)}], item = {"type": "text", "text": ...} |
                  {"type": "image", "image": ...} | {"type": "video", "video": ...}.
        add_vision_id: write "Picture n: " / "Video n: " before each image / video.
        tools: list of JSON-schema dicts, listed in the system turn.
        vision: optional callable(item, kind) -> pieces (str or token id) that replace an image's / video's
                `<|vision_start|><|image_pad|><|vision_end|>` (the Processor's expansion to the real token count).
        Returns ids, or (ids, mask) with return_assistant_mask, or the text with tokenize=False.

        The mask marks what the model must learn to write: every assistant message's content, its tool calls and
        its closing <|im_end|>. Not the "<|im_start|>assistant\\n" header (the template writes it, also at inference)
        and not the "\\n" after <|im_end|>: generation stops at <|im_end|>, so that newline is never sampled.

        Differences from the Jinja template, all on inputs it would silently mis-render: a system message that is
        not first, an image in a system/assistant message, an unknown role or content item raise ValueError
        (the template drops them); content None is empty text (the template fails). Messages that are not dicts,
        content that is not a string / list / None, text that is not a string, malformed tool calls or tools that
        JSON cannot write raise TypeError. Lone UTF-16 surrogates become U+FFFD in every turn.
        """
        pieces = self.render_chat(messages, add_generation_prompt, add_vision_id, tools, vision)
        if not tokenize:
            return "".join(p if isinstance(p, str) else self.id_to_special[p] for p, _ in pieces)
        ids, mask = self.encode_pieces(pieces)
        return (ids, mask) if return_assistant_mask else ids

    def render_chat(self, messages, add_generation_prompt=False, add_vision_id=False, tools=None, vision=None):
        """The chat template: messages -> [(str | special id, trainable)]. Mirrors the Jinja template step by step."""
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
        system_text = "".join(t for _, t in content_items(messages[0].get("content"), "system")) if system else ""
        if tools:
            template("<|im_start|>system\n")
            if system:
                plain(system_text)
                template("\n\n")
            template(TOOLS_HEADER)
            for tool in tools:
                template("\n")
                plain(json.dumps(tool, ensure_ascii=False))
            template(TOOLS_FOOTER)
        elif system:
            template("<|im_start|>system\n")
            plain(system_text)
            template("<|im_end|>\n")

        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role == "system":
                if i > 0:
                    raise ValueError(f"message {i} is a system message; only the first message may be one "
                                     "(the Qwen3-VL template drops the others)")
            elif role == "user":
                template("<|im_start|>user\n")
                user_content(content, role)
                template("<|im_end|>\n")
            elif role == "assistant":
                template("<|im_start|>assistant\n")
                for _, text in content_items(content, role):
                    answer(text)
                for j, call in enumerate(message.get("tool_calls") or []):
                    call = (call.get("function") or call) if isinstance(call, dict) else call
                    if not (isinstance(call, dict) and isinstance(call.get("name"), str) and "arguments" in call):
                        raise TypeError(f"message {i} tool_calls[{j}]={call!r}: must be a dict with 'name' (a string) "
                                        "and 'arguments'")
                    if j > 0 or content:
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
            template("<|im_start|>assistant\n")
        return out


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
