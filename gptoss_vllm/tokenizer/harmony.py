"""Offline gpt-oss tokenizer: the o200k_harmony vocabulary as HF ``tokenizer.json``, with no download.

The BPE ranks come from the ``openai_harmony`` module (a vLLM dependency that embeds the vocabulary);
transformers' ``TikTokenConverter`` turns them into a ``tokenizers`` BPE model with merges. The harmony
special tokens keep their ids (199998 up to ``vocab_size - 1``), so token ids are those of openai/gpt-oss.
The result is cached per ``openai_harmony`` version, so building checkpoints stays fast.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from gptoss_vllm.cache import cache_root

log = logging.getLogger(__name__)

VOCAB_SIZE = 201088
"""Embedding rows of gpt-oss (o200k_harmony padded with reserved specials)."""

NUM_BPE_TOKENS = 199998
"""Ids below this are BPE ranks; ids from it to ``VOCAB_SIZE - 1`` are special tokens."""

SPECIAL_TOKENS = {
    199998: "<|startoftext|>",
    199999: "<|endoftext|>",
    200002: "<|return|>",
    200003: "<|constrain|>",
    200005: "<|channel|>",
    200006: "<|start|>",
    200007: "<|end|>",
    200008: "<|message|>",
    200012: "<|call|>",
}
"""Named harmony special tokens; every other special id is ``<|reserved_N|>``."""

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|return|>"
PAD_TOKEN = "<|endoftext|>"

# The o200k pre-tokeniser: words with their leading punctuation and English contractions, 1-3 digit
# numbers, punctuation runs (with trailing newlines or slashes), newline runs, then other whitespace.
O200K_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def special_token_name(token_id: int) -> str:
    """The harmony name of special token ``token_id``."""
    return SPECIAL_TOKENS.get(token_id, f"<|reserved_{token_id}|>")


def harmony_encoding():
    """The gpt-oss harmony encoding from ``openai_harmony`` (embedded vocabulary, no network)."""
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


def _write_tiktoken_ranks(path: Path) -> None:
    enc = harmony_encoding()
    with path.open("w") as f:
        for rank in range(NUM_BPE_TOKENS):
            raw = bytes(enc._inner.decode_bytes([rank]))
            f.write(f"{base64.b64encode(raw).decode()} {rank}\n")


def build_tokenizer(out_dir: str | os.PathLike, vocab_size: int = VOCAB_SIZE) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``out_dir``."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    if vocab_size <= max(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size {vocab_size} cannot hold the harmony special tokens (ids up to {max(SPECIAL_TOKENS)})"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = [special_token_name(i) for i in range(NUM_BPE_TOKENS, vocab_size)]
    with tempfile.TemporaryDirectory() as tmp:
        ranks = Path(tmp) / "o200k_harmony.tiktoken"
        _write_tiktoken_ranks(ranks)
        backend = TikTokenConverter(
            vocab_file=str(ranks), pattern=O200K_PATTERN, extra_special_tokens=specials
        ).converted()
    for token_id in (NUM_BPE_TOKENS, vocab_size - 1):
        got = backend.token_to_id(special_token_name(token_id))
        if got != token_id:
            raise RuntimeError(
                f"special token {special_token_name(token_id)} landed at id {got}, not {token_id}"
            )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=131072,
        model_input_names=["input_ids", "attention_mask"],
    )
    tok.save_pretrained(str(out))
    # transformers 5 writes its own class name; the 4.x name loads in both (vLLM on CUDA may pin 4.x).
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return out


def _cache_dir() -> Path:
    version = importlib.metadata.version("oss-harmony")
    return cache_root() / "tokenizer" / f"o200k_harmony-{version}-v{VOCAB_SIZE}"


def install_tokenizer(out_dir: str | os.PathLike, vocab_size: int = VOCAB_SIZE) -> None:
    """Copy the tokenizer into ``out_dir``, building it once into the user cache if needed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if vocab_size != VOCAB_SIZE:
        build_tokenizer(out, vocab_size)
        return
    cache = _cache_dir()
    if not all((cache / name).is_file() for name in TOKENIZER_FILES):
        log.info("building the o200k_harmony tokenizer into %s (once, a few seconds)", cache)
        cache.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the cache and rename, so concurrent builders never see a half-written cache.
        staging = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".building-"))
        try:
            build_tokenizer(staging, vocab_size)
            try:
                staging.rename(cache)
            except OSError:
                if not cache.is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(cache / name, out / name)
