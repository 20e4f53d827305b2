"""The text a run trains on, as token batches: files, folders and globs, or the corpora that ship with Python
(the standard library's code, the language reference's prose); 90% train / 10% validation; the batch of a
training step a pure function of (seed, step). A problem with the input is a ValueError naming it."""
import glob
import math
import os
import sysconfig

import torch


def stdlib_code():  # the top-level *.py modules of the running Python's standard library (about 4.7 MB)
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    return "\n\n".join(open(f, encoding="utf-8", errors="replace").read() for f in files)


def pydoc_topics():  # Python's language reference as plain prose (about 0.46 MB)
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_texts(specs):
    """Text from files, folders (recursively) and globs; one clear error for anything missing or empty."""
    files = []
    for spec in specs:
        pattern = os.path.join(spec, "**", "*") if os.path.isdir(spec) else spec
        found = [spec] if os.path.isfile(spec) else sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not found:
            raise ValueError(f"--data {spec}: no such file, folder or matching glob")
        files += found
    texts, skipped = [], 0
    for f in files:
        try:
            texts.append(open(f, "rb").read().decode("utf-8"))
        except UnicodeDecodeError:
            skipped += 1  # a folder may hold images or binaries: only text files are data
    text = "\n\n".join(t for t in texts if t)
    if not text.strip():
        raise ValueError(f"--data {' '.join(specs)}: no text found ({len(files)} file(s), {skipped} not UTF-8 text)")
    return text, skipped


def split_tokens(ids, block_size, what):
    """90% train / 10% validation; each split must hold at least one block plus its target."""
    data = torch.tensor(ids, dtype=torch.long)
    n = int(0.9 * len(data))
    if min(n, len(data) - n) < block_size + 1:
        need = math.ceil((block_size + 1) / 0.1)
        raise ValueError(f"{what}: {len(data)} tokens is too short for block size {block_size} (need at least {need} tokens, or a smaller --block-size)")
    return data[:n], data[n:]


def windows(data, ix, block_size):
    """The block_size-token windows starting at ix, and the same shifted by one: inputs and targets."""
    return torch.stack([data[i : i + block_size] for i in ix]), torch.stack([data[i + 1 : i + 1 + block_size] for i in ix])


def step_seed(seed, step, rank=0):
    return (seed * 1_000_003 + step) * 1009 + rank  # distinct for every (seed, step < 1,000,003, rank < 1009)


def get_batch(data, step, batch_size, block_size, seed, world=1, rank=0):
    """The batch of one step, a pure function of (seed, step, rank): a resumed run sees exactly the batches
    an uninterrupted one does. Every process draws the same global batch and keeps its own slice."""
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=torch.Generator().manual_seed(step_seed(seed, step)))
    return windows(data, ix.chunk(world)[rank], block_size)


def eval_batches(data, n, batch_size, block_size):
    """A fixed set of n validation batches, so before, after, merged and unmerged see the same tokens."""
    ix = torch.randint(len(data) - block_size - 1, (n, batch_size), generator=torch.Generator().manual_seed(1234))
    return [windows(data, row, block_size) for row in ix]
