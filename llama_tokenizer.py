"""The tokenizers of real checkpoints, through tiktoken: LLaMA-3's tokenizer.model (Llama3Tokenizer), a HF
tokenizer.json of the byte-level BPE kind (HFTokenizer), and load_tokenizer, which finds either in a checkpoint
directory. (Not named tokenizers.py, which would shadow the `tokenizers` package.) Re-exported by nanogpt_model.

Only tiktoken at run time.
"""
import base64
import json
import re
from pathlib import Path

import tiktoken


# ----------------------------------------------------------------------------------------------
# LLaMA-3 tokenizer: tiktoken BPE with Meta's split pattern and 256 special tokens after the 128000 ranks

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama-models' llama3/tokenizer.py: these 12, then <|reserved_special_token_2|> ... _245|>
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", "<|image|>"] + [f"<|reserved_special_token_{i}|>" for i in range(2, 246)]

_TIKTOKEN_MAX_CHARS = 400_000  # one tiktoken call at most (llama-models: larger inputs can panic)
_MAX_RUN = 25_000  # longest run of whitespace or non-whitespace per call (tiktoken issue 195: quadratic time)


def _safe_pieces(text):
    """Cut text where llama-models' Tokenizer.encode cuts it (so ids match Meta's exactly): into 400k-char
    windows, and inside each window every run of whitespace or non-whitespace after each _MAX_RUN chars."""
    for w in range(0, len(text), _TIKTOKEN_MAX_CHARS):
        window, start = text[w:w + _TIKTOKEN_MAX_CHARS], 0
        for run in re.finditer(r"\s+|\S+", window):  # re's \s is str.isspace(), what Meta's loop tests
            for cut in range(run.start() + _MAX_RUN, run.end(), _MAX_RUN):
                yield window[start:cut]
                start = cut
        yield window[start:]


class Llama3Tokenizer:
    """LLaMA-3's tokenizer.model: one "base64(token bytes) rank" line per token."""

    def __init__(self, path):
        path = Path(path)
        ranks = {}
        with open(path, "rb") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError:
                    raise ValueError(f"{path}: line {i} is not 'base64 rank': not a LLaMA-3 (tiktoken) tokenizer.model; "
                                     "sentencepiece files (LLaMA-1/2) are not supported") from None
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1}, each once")
        self.special_tokens = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=self.special_tokens)
        self.vocab_size = len(ranks) + len(self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]

    def encode(self, text, bos=False, eos=False):
        """Special-token text such as "<|eot_id|>" inside `text` is encoded as ordinary text (Meta's default)."""
        ids = [i for piece in _safe_pieces(text) for i in self.enc.encode_ordinary(piece)]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])


# HF tokenizer.json of the byte-level BPE kind (GPT-2, LLaMA-3, SmolLM2) -> tiktoken

_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _byte_level_alphabet():
    """GPT-2's bytes_to_unicode, inverted: the printable character that stands for each byte in tokenizer.json."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in keep}
    chars.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in chars)})
    return {c: b for b, c in chars.items()}


class HFTokenizer:
    """A HF tokenizer.json of the byte-level BPE kind as a tiktoken Encoding. tiktoken merges the adjacent pair
    whose concatenation has the lowest rank, HF the pair listed first in `merges`, so a token's rank is the
    index of the first merge that makes it; ranks are mapped back to the file's ids after encoding.
    Added/special tokens inside `text` are encoded as ordinary text, as Llama3Tokenizer does.
    A byte missing from the vocab (SmolLM2's lacks 21, e.g. the control character 0x13) becomes the model's unk token,
    consecutive ones fused as fuse_unk says, or is dropped where there is no unk token, as HF does (HF then also lets
    its neighbours merge across the gap, which happens only around such bytes)."""

    SUPPORTED = ("byte-level BPE tokenizer.json: no normalizer (or an empty Sequence), pre_tokenizer ByteLevel(use_regex=true) or "
                 "Sequence[Split(Regex, Isolated), ByteLevel(use_regex=false)], no byte_fallback to <0xNN> tokens")

    def __init__(self, path):
        path = Path(path)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
            self._build(spec, path)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a supported tokenizer ({e}); supported: {self.SUPPORTED}") from None

    def _build(self, spec, path):
        model, pre, norm = spec["model"], spec.get("pre_tokenizer") or {}, spec.get("normalizer")
        # transformers 5.17 converts SmolLM2's GGUF with an empty normalizer Sequence and byte_fallback on (5.24: null and
        # off), the vocab and merges identical: an empty Sequence changes no text, and byte_fallback only sends a piece
        # missing from the vocab to <0xNN> tokens, of which a byte-level vocab has none (it falls back to unk then)
        empty_norm = norm is None or norm == {"type": "Sequence", "normalizers": []}
        fallback = model.get("byte_fallback") and any(re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t) for t in model.get("vocab", {}))
        if model.get("type") != "BPE" or fallback or not empty_norm or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise ValueError("model is not plain byte-level BPE (or has a normalizer)")
        steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
        if [p.get("type") for p in steps] == ["ByteLevel"] and steps[0].get("use_regex", True):
            pattern = _GPT2_PATTERN
        elif ([p.get("type") for p in steps] == ["Split", "ByteLevel"] and "Regex" in steps[0]["pattern"]
              and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert") and not steps[1].get("use_regex")):
            pattern = steps[0]["pattern"]["Regex"]
        else:
            raise ValueError(f"pre_tokenizer {[p.get('type') for p in steps]} is not supported")
        if any(p.get("add_prefix_space") for p in steps if p.get("type") == "ByteLevel"):
            raise ValueError("ByteLevel add_prefix_space=true is not supported")
        alphabet = _byte_level_alphabet()
        vocab = model["vocab"]
        to_bytes = {tok: bytes(alphabet[c] for c in tok) for tok in vocab}  # KeyError: not byte-level
        # single bytes first; bytes that never occur in UTF-8 (0xC0, 0xC1, 0xF5-0xFF) may be absent from the vocab
        ranks = {}
        for b in range(256):
            if bytes([b]) in to_bytes.values():
                ranks[bytes([b])] = len(ranks)
        for merge in model["merges"]:  # "a b" (older files) or ["a", "b"]
            a, b = merge.split(" ") if isinstance(merge, str) else merge
            ranks.setdefault(to_bytes[a] + to_bytes[b], len(ranks))
        if model.get("ignore_merges"):  # HF then takes a pre-token found whole in the vocab as is: tiktoken does too
            for tok in vocab:
                ranks.setdefault(to_bytes[tok], len(ranks))
        id_of = {bytes_: vocab[tok] for tok, bytes_ in to_bytes.items()}
        if not ranks.keys() <= id_of.keys():
            raise ValueError(f"byte or merged token {next(iter(ranks.keys() - id_of.keys()))!r} is not in the vocab")
        added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        bad = next(((tok, i) for tok, i in [*vocab.items(), *added.items()]
                    if not isinstance(i, int) or isinstance(i, bool) or i < 0), None)
        if bad:  # a negative id would be encoded as an id outside the vocabulary
            raise ValueError(f"token {bad[0]!r} has id {bad[1]!r}: ids must be non-negative integers")
        # bytes missing from the vocab: ranks of their own after every merge (no merge holds them), read as unk or dropped
        self._missing = len(ranks)
        for b in range(256):
            ranks.setdefault(bytes([b]), len(ranks))
        unk = model.get("unk_token")
        self._unk_id, self._fuse_unk = (vocab.get(unk, added.get(unk)) if unk else None), bool(model.get("fuse_unk"))
        self.enc = tiktoken.Encoding(name=path.name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        self._id_of_rank = [0] * len(ranks)
        for token, rank in ranks.items():
            self._id_of_rank[rank] = id_of.get(token, -1)
        self._bytes_of_id = {i: to_bytes[tok] for tok, i in vocab.items()}
        self._bytes_of_id.update({i: text.encode("utf-8") for text, i in added.items()})  # added tokens are literal
        self.special_tokens = added
        self.vocab_size = max(self._bytes_of_id) + 1
        config = path.with_name("tokenizer_config.json")  # names the bos/eos tokens, where present
        config = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}

        def token_id(key):
            tok = config.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            return added.get(tok, vocab.get(tok)) if tok else None
        self.bos_id, self.eos_id = token_id("bos_token"), token_id("eos_token")

    def encode(self, text, bos=False, eos=False):
        ranks = self.enc.encode_ordinary(text)
        if ranks and max(ranks) >= self._missing:  # a byte the vocab lacks: unk, or nothing
            ids, previous = [], False
            for r in ranks:
                missing = r >= self._missing
                if not missing:
                    ids.append(self._id_of_rank[r])
                elif self._unk_id is not None and not (previous and self._fuse_unk):
                    ids.append(self._unk_id)
                previous = missing
        else:
            ids = [self._id_of_rank[r] for r in ranks]
        return [self.bos_id] * bool(bos and self.bos_id is not None) + ids + [self.eos_id] * bool(eos and self.eos_id is not None)

    def decode(self, ids):
        return b"".join(self._bytes_of_id[int(i)] for i in ids).decode("utf-8", errors="replace")


def load_tokenizer(path):
    """The tokenizer of a checkpoint directory: original/tokenizer.model or tokenizer.model (LLaMA-3),
    else a byte-level BPE tokenizer.json. `path` may also name the file itself."""
    path = Path(path)
    candidates = [path] if path.is_file() else [path / "original" / "tokenizer.model", path / "tokenizer.model",
                                                  path / "tokenizer.json"]
    for c in candidates:
        if c.is_file():
            return HFTokenizer(c) if c.suffix == ".json" else Llama3Tokenizer(c)
    raise FileNotFoundError(f"{path}: no tokenizer (looked for original/tokenizer.model, tokenizer.model, tokenizer.json)")
