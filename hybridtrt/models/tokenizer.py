"""Tokenizers: the checkpoint's own ``tokenizer.json`` (HF ``tokenizers`` format), and a byte-level
one that the built-in presets ship so that prompts work end to end."""

from __future__ import annotations

from pathlib import Path

from hybridtrt.errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"


def write_byte_tokenizer(out_dir: str | Path, vocab_size: int) -> Path:
    """Write a byte-level BPE tokenizer with no merges: one token per byte (ids 0..255)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if vocab_size < 256:
        raise CheckpointError(f"a byte tokenizer needs vocab_size ≥ 256, got {vocab_size}")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    path = Path(out_dir) / TOKENIZER_FILE
    tok.save(str(path))
    return path


def load_tokenizer(checkpoint_dir: str | Path):
    """The checkpoint's ``tokenizers.Tokenizer``, or None when it has no ``tokenizer.json``."""
    path = Path(checkpoint_dir) / TOKENIZER_FILE
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise CheckpointError(f"{path} is not a valid tokenizer.json: {e}") from None
