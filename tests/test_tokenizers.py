"""Tokenizers (llama_tokenizer.py): LLaMA-3's tokenizer.model, HF tokenizer.json, SmolLM2's.

Run alone: python -m pytest -q tests/test_tokenizers.py (test_all.py runs every topic)."""
import json
import re
from pathlib import Path

import pytest

import nanogpt_model as M

from conftest import llama_needs_hf, llama_needs_llama_models, llama_pydoc_text


# ----------------------------------------------------------------------------------------------
# the real LLaMA-3 tokenizer (llama-models ships tokenizer.model)


@pytest.fixture(scope="module")
def llama_meta_tok():
    from llama_models.llama3.tokenizer import Tokenizer
    return Tokenizer.get_instance()


@pytest.fixture(scope="module")
def llama_tok():
    import llama_models.llama3
    return M.Llama3Tokenizer(Path(llama_models.llama3.__file__).parent / "tokenizer.model")


@llama_needs_llama_models
def test_llama3_golden_vectors(llama_tok):
    ids = [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert llama_tok.encode("This is a test sentence.", bos=True, eos=True) == ids
    assert llama_tok.decode(ids) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    assert (llama_tok.vocab_size, llama_tok.bos_id, llama_tok.eos_id, llama_tok.eot_id) == (128256, 128000, 128001, 128009)
    assert llama_tok.encode("This is a response.") == [2028, 374, 264, 2077, 13]  # from llama-models' own tests
    assert llama_tok.encode("user") == [882] and llama_tok.encode("\n\n") == [271]


@llama_needs_llama_models
def test_llama3_special_tokens_equal_meta(llama_tok, llama_meta_tok):
    assert llama_tok.special_tokens == llama_meta_tok.special_tokens
    assert llama_tok.special_tokens["<|start_header_id|>"] == 128006 and llama_tok.special_tokens["<|end_header_id|>"] == 128007
    assert max(llama_tok.special_tokens.values()) == 128255 and len(llama_tok.special_tokens) == 256
    for name, i in llama_tok.special_tokens.items():
        assert llama_tok.decode([i]) == name
    # special-token text inside ordinary text is ordinary text, as in Meta's encode()
    s = "Hi<|eot_id|>there<|begin_of_text|>"
    assert llama_tok.encode(s) == llama_meta_tok.encode(s, bos=False, eos=False) and 128009 not in llama_tok.encode(s)


LLAMA_AWKWARD = ["", " ", "\n", "héllo wörld — ünïcödé", "日本語のテキスト、中文，한국어", "emoji 👩‍👩‍👧 🇫🇷 ok",
           "123456789 1,000,000.25 3.14159", "tabs\t\tand   spaces   \n\n\n  trailing   ", "I'll've it's WE'RE",
           "\u200b\u00a0\u2028\u3000zero-width and odd spaces", "a" * 1000, "🙂" * 300, "\r\n" * 50, "x\x00y\x7f"]


@llama_needs_llama_models
def test_llama3_round_trips_equal_meta(llama_tok, llama_meta_tok):
    for s in LLAMA_AWKWARD:
        ids = llama_tok.encode(s)
        assert ids == llama_meta_tok.encode(s, bos=False, eos=False), repr(s)
        assert llama_tok.decode(ids) == s


@llama_needs_llama_models
def test_llama3_multi_megabyte_input(llama_tok, llama_meta_tok):
    """Several MB, including runs of whitespace and non-whitespace longer than tiktoken handles in one call:
    same ids as Meta's reference, exact round trip."""
    import pydoc_data.topics
    text = "".join(pydoc_data.topics.topics.values())
    big = text * 5 + " " * 60_000 + "y" * 70_000 + "\n" * 30_001 + text[:1000]
    assert len(big.encode()) > 2_000_000
    ids = llama_tok.encode(big, bos=True)
    assert ids == [128000] + llama_meta_tok.encode(big, bos=False, eos=False)
    assert llama_tok.decode(ids[1:]) == big


@llama_needs_llama_models
def test_llama_load_tokenizer_finds_the_file(tmp_path):
    import llama_models.llama3
    src = Path(llama_models.llama3.__file__).parent / "tokenizer.model"
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "tokenizer.model").write_bytes(src.read_bytes())
    assert M.load_tokenizer(tmp_path).encode("This is a test sentence.") == [2028, 374, 264, 1296, 11914, 13]
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        M.load_tokenizer(tmp_path / "original" / "nowhere")
    (tmp_path / "sp.model").write_bytes(b"\x0a\x0b\x3c\x75\x6e\x6b\x3e binary sentencepiece")
    with pytest.raises(ValueError, match="not a LLaMA-3"):
        M.load_tokenizer(tmp_path / "sp.model")


# ----------------------------------------------------------------------------------------------
# HF tokenizer.json (byte-level BPE) through tiktoken


@pytest.fixture(scope="module")
def llama_llama3_tokenizer_json(tmp_path_factory):
    """The real LLaMA-3 vocabulary as a HF tokenizer.json, made by transformers' own TikTokenConverter
    (the layout of LLaMA-3 HF directories: Split(regex) + ByteLevel, ignore_merges, 256 added tokens)."""
    import llama_models.llama3
    from transformers.convert_slow_tokenizer import TikTokenConverter
    d = tmp_path_factory.mktemp("llama3_json")
    src = Path(llama_models.llama3.__file__).parent / "tokenizer.model"
    TikTokenConverter(vocab_file=str(src), extra_special_tokens=M.LLAMA3_SPECIAL_TOKENS).converted().save(str(d / "tokenizer.json"))
    return d / "tokenizer.json"

@llama_needs_hf
@llama_needs_llama_models
def test_tokenizer_json_llama3_equals_tokenizers_library(llama_llama3_tokenizer_json, llama_tok):
    from tokenizers import Tokenizer
    ref = Tokenizer.from_file(str(llama_llama3_tokenizer_json))
    ref.encode_special_tokens = True  # special-token text is ordinary text, as in ours and Meta's
    ours = M.load_tokenizer(llama_llama3_tokenizer_json)
    assert ours.vocab_size == 128256
    for s in [llama_pydoc_text()] + LLAMA_AWKWARD + ["<|begin_of_text|>text<|eot_id|>"]:
        ids = ours.encode(s)
        assert ids == ref.encode(s, add_special_tokens=False).ids, repr(s[:60])
        assert ours.decode(ids) == s
    assert ours.encode("This is a test sentence.") == llama_tok.encode("This is a test sentence.")
    specials = list(range(128000, 128256))
    assert ours.decode(specials) == llama_tok.decode(specials)


def test_llama_tokenizer_json_ignore_merges_takes_a_whole_pre_token_from_the_vocab(tmp_path):
    """ignore_merges (LLaMA-3's tokenizer.json has it): a pre-token found whole in the vocab is one token, even where the
    merges cannot build it ("abc" here: only "a b" and "Ġ ab" are merges); without it, merges alone. Against the tokenizers
    library. (LLaMA-3's own vocab is all reachable by merges, so its test cannot tell the two apart.)"""
    tokenizers = pytest.importorskip("tokenizers")
    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    vocab = {**{c: i for i, c in enumerate(alphabet)}, "ab": 256, "abc": 257, "Ġab": 258}
    for ignore in (True, False):
        ref = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [("a", "b"), ("Ġ", "ab")], ignore_merges=ignore))
        ref.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        ref.save(str(tmp_path / "tokenizer.json"))
        ours = M.load_tokenizer(tmp_path / "tokenizer.json")
        for s in ["abc", "abc abc", "ab ab", " ab!"]:
            assert ours.encode(s) == ref.encode(s).ids, (ignore, s)
        assert (ours.encode("abc") == [257]) == ignore


def test_llama_tokenizer_json_other_kinds_are_refused(tmp_path):
    sentencepiece_like = {"normalizer": {"type": "Sequence", "normalizers": []}, "pre_tokenizer": None,
                          "model": {"type": "BPE", "byte_fallback": True, "vocab": {"<unk>": 0}, "merges": []}}
    unigram = {"normalizer": None, "pre_tokenizer": {"type": "Metaspace"}, "model": {"type": "Unigram", "vocab": []}}
    for name, spec in [("sp", sentencepiece_like), ("uni", unigram)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text(json.dumps(spec))
        with pytest.raises(ValueError, match="supported: byte-level BPE"):
            M.load_tokenizer(tmp_path / name)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="junk.json"):
        M.load_tokenizer(tmp_path / "junk.json")


def smollm2_shaped_tokenizer_json(transformers_version):
    """A small byte-level BPE tokenizer.json laid out as transformers writes SmolLM2's from its GGUF: 5.24 (no normalizer,
    no unk, no byte fallback) or 5.17 (an empty normalizer Sequence, byte_fallback and fuse_unk on, unk <|endoftext|>,
    offsets untrimmed, a ByteFallback decoder). Like SmolLM2's, the vocab lacks some bytes (0x13, 0xF1 here)."""
    alphabet = {b: c for c, b in M._byte_level_alphabet().items()}
    pieces = [alphabet[b] for b in range(256) if b not in (0x13, 0xF1)]
    merges = [["h", "e"], ["l", "l"], ["he", "ll"], ["Ġ", "w"], ["o", "r"], ["Ġw", "or"], ["l", "d"], ["Ġ", "t"], ["Ġt", "he"]]
    vocab = {t: i + 1 for i, t in enumerate(pieces + ["".join(m) for m in merges])}
    new = transformers_version == "5.17"
    model = {"type": "BPE", "dropout": None, "unk_token": "<|endoftext|>" if new else None, "continuing_subword_prefix": None if new else "",
             "end_of_word_suffix": None if new else "", "fuse_unk": new, "byte_fallback": new, "ignore_merges": False,
             "vocab": {"<|endoftext|>": 0, **vocab}, "merges": merges}
    byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}],
            "normalizer": {"type": "Sequence", "normalizers": []} if new else None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": not new, "use_regex": True},
            "post_processor": None, "model": model,
            "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Replace", "pattern": {"String": "\u2581"},
                                                                                   "content": " "}, byte_level]} if new else byte_level}


@llama_needs_hf
def test_tokenizer_json_from_transformers_5_17_is_the_same_tokenizer(tmp_path):
    """transformers 5.17 (on the GPU machine) writes SmolLM2's tokenizer.json with an empty normalizer Sequence and
    byte_fallback on; 5.24 with neither; vocab and merges are the same. Both load, encode alike, and match the tokenizers
    library, also on the bytes the vocab lacks: 5.17's file makes them unk (consecutive ones fused), 5.24's drops them."""
    from tokenizers import Tokenizer
    ours, ref = {}, {}
    for v in ("5.17", "5.24"):
        path = tmp_path / v / "tokenizer.json"
        path.parent.mkdir()
        path.write_text(json.dumps(smollm2_shaped_tokenizer_json(v)))
        ours[v], ref[v] = M.load_tokenizer(path.parent), Tokenizer.from_file(str(path))
    for text in ["hello world, the world", " the\tthe\n\nhello", "héllo wörld 日本語 🤖", "1 + 2 = 3\n"]:
        assert ours["5.17"].encode(text) == ours["5.24"].encode(text) == ref["5.24"].encode(text).ids, text
        assert ours["5.17"].decode(ours["5.17"].encode(text)) == text
    for text, unk in [("a\x13b", [0]), ("hello\x13\x13world", [0]), ("x \x13 y", [0]), ("\U00050000z", [0])]:  # 0xF1 leads U+50000
        assert ours["5.17"].encode(text) == ref["5.17"].encode(text).ids, text
        assert 0 in ours["5.17"].encode(text) and ours["5.17"].encode(text).count(0) == len(unk)
        assert ours["5.24"].encode(text) == ref["5.24"].encode(text).ids == [i for i in ours["5.17"].encode(text) if i != 0], text
    sp = smollm2_shaped_tokenizer_json("5.17")
    sp["model"]["vocab"]["<0x13>"] = len(sp["model"]["vocab"])  # byte fallback to <0xNN> tokens is sentencepiece's kind: still refused
    (tmp_path / "sp.json").write_text(json.dumps(sp))
    with pytest.raises(ValueError, match="not plain byte-level BPE"):
        M.load_tokenizer(tmp_path / "sp.json")


def test_tokenizer_json_with_a_negative_id_is_refused(tmp_path):
    """A vocab (or added token) id below 0 would be encoded as an id outside the vocabulary: refused, naming the file and token."""
    for where in ("vocab", "added"):
        spec = smollm2_shaped_tokenizer_json("5.24")
        if where == "vocab":
            spec["model"]["vocab"]["Ġthe"] = -3
        else:
            spec["added_tokens"][0]["id"] = -1
        path = tmp_path / where / "tokenizer.json"
        path.parent.mkdir()
        path.write_text(json.dumps(spec))
        token = "Ġthe" if where == "vocab" else "<|endoftext|>"
        with pytest.raises(ValueError, match=re.escape(f"{path}: not a supported tokenizer (token '{token}' has id {-3 if where == 'vocab' else -1}: "
                                                       "ids must be non-negative integers)")):
            M.load_tokenizer(path.parent)

@pytest.mark.slow
def test_llama_smollm2_tokenizer_equals_hf(llama_smollm2_dir):
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(llama_smollm2_dir)
    ours = M.load_tokenizer(llama_smollm2_dir)
    assert (ours.vocab_size, ours.bos_id, ours.eos_id) == (len(ref), ref.bos_token_id, ref.eos_token_id)
    for s in [llama_pydoc_text()] + LLAMA_AWKWARD + ["<|im_start|>user\nhi<|im_end|>", "<|endoftext|><repo_name>"]:
        ids = ours.encode(s)
        assert ids == ref.encode(s, add_special_tokens=False, split_special_tokens=True), repr(s[:60])
        assert ours.decode(ids) == s
    special = [ref.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")]
    assert ours.decode(special) == ref.decode(special)
