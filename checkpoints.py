"""LLaMA checkpoints on disk: safetensors read and written by hand (strictly checked, memory-mapped),
a HF directory's weights (model.safetensors or its shards), and load_llama, which builds a LLaMA from a
HF or Meta checkpoint directory. The names are re-exported by nanogpt_model.

Only torch at run time.
"""
import json
import math
import mmap
import os
import re
from pathlib import Path

import torch


# ----------------------------------------------------------------------------------------------
# safetensors, read and written by hand: 8-byte little-endian header length N, N bytes of JSON
# {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the data,
# which the tensors must cover exactly, back to back. Checked as strictly as the safetensors library
# (it rejects everything rejected here but duplicate names, which it silently resolves to the last).

_ST_DTYPES = {name: getattr(torch, attr) for name, attr in [
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"), ("I32", "int32"),
    ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"), ("U16", "uint16"), ("U32", "uint32"),
    ("U64", "uint64"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu")]
    if hasattr(torch, attr)}
_ST_MAX_HEADER = 100_000_000  # the safetensors library's own limit


def _json_object_no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _is_uint(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_safetensors(path):
    """name -> tensor. Tensors view a private (copy-on-write) mmap of the file: no copy, no read until used,
    writes never reach the file. Any malformed file -> ValueError naming the file (and tensor)."""
    path = str(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ValueError(f"{path}: {size} bytes, too short for the 8-byte safetensors header length")
        n = int.from_bytes(f.read(8), "little")
        if n > _ST_MAX_HEADER:
            raise ValueError(f"{path}: header length {n} is absurd (limit {_ST_MAX_HEADER}): not a safetensors file?")
        if 8 + n > size:
            raise ValueError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
        try:
            header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_json_object_no_duplicates)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ValueError(f"{path}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: header is a JSON {type(header).__name__}, not an object")
        meta = header.pop("__metadata__", None)  # optional; null is accepted by the library too
        if meta is not None and (not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())):
            raise ValueError(f"{path}: __metadata__ must map strings to strings")
        data_start, data_len = 8 + n, size - 8 - n
        entries = []
        for name, info in header.items():
            where = f"{path}: tensor {name!r}"
            if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
                raise ValueError(f"{where}: entry must be an object with dtype, shape and data_offsets")
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
                raise ValueError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(_ST_DTYPES)})")
            if not isinstance(shape, list) or not all(_is_uint(s) for s in shape):
                raise ValueError(f"{where}: shape {shape!r} is not a list of non-negative integers")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)
                    and offsets[0] <= offsets[1]):
                raise ValueError(f"{where}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
            dtype = _ST_DTYPES[dtype]
            nbytes = math.prod(shape) * dtype.itemsize
            if offsets[1] - offsets[0] != nbytes:
                raise ValueError(f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, "
                                 f"shape {shape} of {info['dtype']} needs {nbytes}")
            if offsets[1] > data_len:
                raise ValueError(f"{where}: data_offsets {offsets} run past the end of the data ({data_len} bytes)")
            entries.append((offsets[0], offsets[1], name, dtype, shape))
        entries.sort(key=lambda e: e[:2])
        covered = 0
        for begin, end, name, _, _ in entries:  # back to back: no overlap, no gap
            if begin != covered:
                raise ValueError(f"{path}: tensor {name!r} starts at byte {begin} of the data, expected {covered} "
                                 f"({'overlaps the previous tensor' if begin < covered else 'leaves a gap'})")
            covered = end
        if covered != data_len:
            raise ValueError(f"{path}: the tensors cover {covered} of the {data_len} data bytes")
        # ACCESS_COPY = MAP_PRIVATE: writable tensors (torch wants that), the file itself is never changed
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if data_len else None
    out = {}
    for begin, end, name, dtype, shape in entries:
        if begin == end:
            out[name] = torch.empty(shape, dtype=dtype)
        elif (data_start + begin) % dtype.itemsize == 0:  # aligned: a zero-copy view of the mapping
            out[name] = torch.frombuffer(buf, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                         offset=data_start + begin).view(shape)
        else:  # the format does not promise alignment; copy this one tensor rather than build a misaligned view
            raw = torch.frombuffer(buf, dtype=torch.uint8, count=end - begin, offset=data_start + begin)
            out[name] = raw.clone().view(dtype).view(shape)
    return out


def write_safetensors(path, tensors, metadata=None):
    """Write name -> tensor as a safetensors file that read_safetensors and the safetensors library read back
    bit for bit. As the library lays it out: widest dtypes first, then by name, and the header padded with
    spaces to 8 bytes, so every tensor starts at a multiple of its own size (our reader maps it without a copy)."""
    codes = {dtype: code for code, dtype in _ST_DTYPES.items()}
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header, offset = {"__metadata__": dict(metadata)} if metadata else {}, 0
    for name in order:
        t = tensors[name]
        if t.dtype not in codes:
            raise ValueError(f"{path}: tensor {name!r} is {t.dtype}, which safetensors cannot store")
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.numel() * t.element_size()]}
        offset = header[name]["data_offsets"][1]
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for name in order:  # one tensor at a time, as raw bytes: a mapped base tensor is read once, never copied whole
            f.write(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


# ----------------------------------------------------------------------------------------------
# the checkpoint loader


def load_llama(path, device="cpu", dtype=None):
    """A LLaMA from a HF directory (config.json + model.safetensors or its shard index) or a Meta directory
    (params.json + consolidated.00.pth; also found under original/). dtype=None keeps the checkpoint's dtype.
    The model is built on the meta device and takes the loaded tensors as they are (same dtype, same device:
    no copy), so memory stays close to one copy of the weights."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such checkpoint directory")
    if (root / "config.json").is_file():
        cfg, tensors, names = _read_hf(root)
    elif (root / "params.json").is_file() or (root / "original" / "params.json").is_file():
        cfg, tensors, names = _read_meta(root if (root / "params.json").is_file() else root / "original")
    else:
        raise ValueError(f"{root}: unknown checkpoint layout: expected config.json + model.safetensors (HF) "
                         "or params.json + consolidated.00.pth (Meta)")
    return _assemble(cfg, tensors, names, root, device, dtype)


def read_json(path):
    """A config file's JSON; broken JSON -> ValueError naming the file, as the loader's other errors do."""
    try:
        return json.loads(Path(path).read_text())
    except ValueError as e:  # UnicodeDecodeError too
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_config(path, **meta):
    """The LLaMAConfig of a HF config.json, or of a Meta params.json (meta: from_meta's vocab_size and
    tie_word_embeddings, which the weights decide); a missing key or a bad value -> ValueError naming the file."""
    spec = read_json(path)
    try:
        if not isinstance(spec, dict):
            raise ValueError(f"a JSON {type(spec).__name__}, not an object")
        return LLaMAConfig.from_meta(spec, **meta) if Path(path).name == "params.json" else LLaMAConfig.from_hf(spec)
    except KeyError as e:
        raise ValueError(f"{path}: missing key {e}") from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None


def _read_hf(root):
    cfg = read_config(root / "config.json")
    raw = read_hf_weights(root)
    tensors, names = {}, {}
    for name, t in raw.items():
        ours = name.removeprefix("model.")
        if ours.endswith("rotary_emb.inv_freq"):  # old transformers saved this derived buffer
            continue
        tensors[ours], names[ours] = t, name
    return cfg, tensors, names


# a HF directory's weights: model.safetensors, or shards listed by model.safetensors.index.json
SHARD_BYTES = 5 * 2**30  # write_hf_weights starts a new shard past this (5 GiB, a common size of the Hub's LLaMA shards)


def read_hf_weights(root):
    """name -> tensor of a HF directory, the names as in its files (model.layers.0...), each shard checked against the index."""
    root = Path(root)
    single, index = root / "model.safetensors", root / "model.safetensors.index.json"
    if single.is_file():
        raw = read_safetensors(single)
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
        except (ValueError, KeyError, TypeError, AssertionError):
            raise ValueError(f"{index}: not a shard index (expected {{\"weight_map\": {{tensor: file}}}})") from None
        raw = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:
                raise ValueError(f"{index}: shard name {shard!r} is not a plain file name")
            if not (root / shard).is_file():
                raise FileNotFoundError(f"{root / shard}: shard listed in {index.name} is missing")
            for name, t in read_safetensors(root / shard).items():
                if weight_map.get(name) != shard:
                    raise ValueError(f"{root / shard}: tensor {name} is not assigned to this shard by {index.name}")
                raw[name] = t
        if weight_map.keys() - raw.keys():
            name = sorted(weight_map.keys() - raw.keys())[0]
            raise ValueError(f"{root / weight_map[name]}: tensor {name} listed in {index.name} is not in the file")
    elif (root / "pytorch_model.bin").is_file() or (root / "pytorch_model.bin.index.json").is_file():
        raise ValueError(f"{root}: only pytorch_model.bin (a pickle) found; this loader reads safetensors only")
    else:
        raise FileNotFoundError(f"{root}: config.json but no model.safetensors or model.safetensors.index.json")
    return raw


def write_hf_weights(root, tensors, max_shard_bytes=None):
    """Write name -> tensor into the directory root as read_hf_weights (and transformers) read it: model.safetensors,
    or past max_shard_bytes (default SHARD_BYTES) model-0000i-of-0000n.safetensors shards, split as transformers'
    save_pretrained splits them (huggingface_hub), with model.safetensors.index.json. Returns the names of the files written."""
    root, shards, current, size, max_shard_bytes = Path(root), [], [], 0, max_shard_bytes or SHARD_BYTES
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if n > max_shard_bytes:  # a tensor over the limit gets a shard of its own; the one being filled stays open
            shards.append([name])
            continue
        if size + n > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    if current or not shards:
        shards.append(current)
    files = ["model.safetensors"] if len(shards) == 1 else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for file, names in zip(files, shards):
        write_safetensors(root / file, {n: tensors[n] for n in names}, metadata={"format": "pt"})  # transformers wants "pt"
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {n: file for file, names in zip(files, shards) for n in names}}
        (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        files.append("model.safetensors.index.json")
    return files


# Meta name -> ours; q/k additionally get their rows permuted
_META_NAMES = [(r"tok_embeddings\.", "embed_tokens."), (r"output\.", "lm_head."),
               (r"attention\.w([qkvo])\.", r"self_attn.\1_proj."), (r"feed_forward\.w1\.", "mlp.gate_proj."),
               (r"feed_forward\.w2\.", "mlp.down_proj."), (r"feed_forward\.w3\.", "mlp.up_proj."),
               (r"attention_norm\.", "input_layernorm."), (r"ffn_norm\.", "post_attention_layernorm.")]


def _meta_to_half_split(w, n_heads):
    """Meta's RoPE rotates adjacent pairs (x0, x1), (x2, x3), ... of each head; ours (HF's) rotates
    (x_i, x_{i+d/2}). Reordering each head's output rows to [even rows, odd rows] makes the two equal.
    For k the heads are the KV heads."""
    out, d_in = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, d_in).transpose(1, 2).reshape(out, d_in)


def _read_meta(root):
    shards = sorted(root.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(f"{root}: params.json but no consolidated.00.pth")
    if len(shards) > 1:
        raise ValueError(f"{root}: {len(shards)} model-parallel shards (consolidated.*.pth) are not supported, only "
                         "single-file Meta checkpoints (LLaMA-3 1B/3B/8B); load the HF layout of this model instead")
    try:
        raw = torch.load(shards[0], map_location="cpu", weights_only=True, mmap=True)
        assert isinstance(raw, dict) and all(isinstance(t, torch.Tensor) for t in raw.values())
    except Exception as e:  # weights_only: never unpickles code; anything odd is reported, not run
        raise ValueError(f"{shards[0]}: not a state dict of tensors ({type(e).__name__}: {e})") from None
    emb = raw.get("tok_embeddings.weight")
    cfg = read_config(root / "params.json", vocab_size=None if emb is None else emb.shape[0], tie_word_embeddings="output.weight" not in raw)
    if emb is None:
        raise ValueError(f"{shards[0]}: tensor tok_embeddings.weight is missing")
    tensors, names = {}, {}
    for name, t in raw.items():
        if name == "rope.freqs":  # LLaMA-2 files carry their RoPE table; we derive it from params.json
            continue
        ours = name
        for pattern, repl in _META_NAMES:
            ours = re.sub(pattern, repl, ours)
        kind = re.search(r"self_attn\.([qk])_proj\.weight$", ours)
        heads = {"q": cfg.num_attention_heads, "k": cfg.num_key_value_heads}[kind[1]] if kind else None
        if heads and t.ndim == 2 and t.shape[0] == heads * cfg.head_dim:  # a wrong shape is reported below
            t = _meta_to_half_split(t, heads)
        tensors[ours], names[ours] = t, name
    return cfg, tensors, names


def _assemble(cfg, tensors, names, root, device, dtype):
    with torch.device("meta"):  # shapes only: no memory, no init
        model = LLaMA(cfg)
    expected = {name: p.shape for name, p in model.named_parameters()}  # a tied head is listed once, as embed_tokens
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store the copy too
    for name, shape in expected.items():
        if name not in tensors:
            raise ValueError(f"{root}: tensor {name} is missing from the checkpoint")
        if tensors[name].shape != shape:
            raise ValueError(f"{root}: tensor {names[name]} has shape {tuple(tensors[name].shape)}, "
                             f"the config expects {tuple(shape)}")
        if not tensors[name].is_floating_point():
            raise ValueError(f"{root}: tensor {names[name]} is {tensors[name].dtype}: quantized checkpoints are not supported")
    unexpected = sorted(tensors.keys() - expected.keys())
    if unexpected:
        raise ValueError(f"{root}: unexpected tensor {names[unexpected[0]]} ({len(unexpected)} in all): not a plain LLaMA")
    dtype = dtype or tensors["embed_tokens.weight"].dtype
    # .to() returns the mmap-backed tensor itself when dtype and device already match
    model.load_state_dict({n: tensors[n].to(device=device, dtype=dtype) for n in expected}, strict=False, assign=True)
    if cfg.tie_word_embeddings:  # assign=True replaced the shared Parameter; share the new one again
        model.lm_head.weight = model.embed_tokens.weight
    return model


# at the end, not the top: nanogpt_model re-exports this module's names, so whichever of the two is imported
# first, the other must find them defined
from nanogpt_model import LLaMA, LLaMAConfig  # noqa: E402
