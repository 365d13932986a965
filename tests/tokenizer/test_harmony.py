"""The offline o200k_harmony tokenizer agrees with openai_harmony token for token, both ways."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from gptoss_vllm.tokenizer.harmony import SPECIAL_TOKENS, VOCAB_SIZE, harmony_encoding, special_token_name

MULTILINGUAL = [
    "Grüße aus Köln! Ça va? Niño, ¿qué tal? Æsir ø å",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "日本語のテキストと漢字、カタカナ。中文句子：你好，世界！한국어 문장입니다.",
    "مرحبا بالعالم — שלום עולם — नमस्ते दुनिया — สวัสดีชาวโลก",
    "Emoji 🤖🚀👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and skin tones 👍🏽 ZWJ",
    "Combining: e\u0301 a\u0308 n\u0303; math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∀x∈ℝ: x² ≥ 0",
    "tabs\tand\r\nwindows\r\nnewlines \u00a0nbsp\u2003em-space   trailing   \n\n\n",
    "I'm sure they'll've done it; WE'RE DONE. don'T Shouldn't",
    "numbers 1234567890 3.14159 -42 1e-5 0x1F 1,000,000",
    "<|start|>system<|message|>Reasoning: high<|end|><|start|>user<|message|>2+2?<|end|>"
    "<|start|>assistant<|channel|>analysis<|message|>easy<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>",
    "<|reserved_200013|><|constrain|>json<|call|><|endoftext|><|startoftext|><|reserved_201087|>",
]


def _source_corpus(limit: int = 120) -> list[str]:
    """Real source files of several languages from this Python installation and torch's headers."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((stdlib / "email").glob("*.py")) + sorted((stdlib / "asyncio").glob("*.py"))
    files += sorted((Path(torch.__file__).parent / "include" / "c10" / "util").glob("*.h"))[:40]
    return [f.read_text(errors="replace") for f in files[:limit]]


def _random_unicode(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x52F), (0x600, 0x6FF), (0x900, 0x97F),
              (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x300, 0x36F)]  # fmt: skip
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
        if rng.random() < 0.15:
            out.append(rng.choice([" ", "  ", "\n", "\t", "'s", "123", "<|end|>"]))
    return "".join(out)


@pytest.fixture(scope="module")
def tokenizers(tiny_checkpoint_dirs):
    hf = AutoTokenizer.from_pretrained(tiny_checkpoint_dirs["mxfp4"])
    return hf, harmony_encoding()


def test_vocabulary_and_special_ids(tokenizers) -> None:
    hf, enc = tokenizers
    assert len(hf) == VOCAB_SIZE
    for token_id in [*SPECIAL_TOKENS, 200000, 200013, 200018, VOCAB_SIZE - 1]:
        name = special_token_name(token_id)
        assert hf.convert_tokens_to_ids(name) == token_id
        assert enc.decode([token_id]) == name
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (199998, 200002, 199999)


def test_encode_and_decode_match_harmony_on_a_varied_corpus(tokenizers) -> None:
    hf, enc = tokenizers
    rng = random.Random(0)
    corpus = MULTILINGUAL + _source_corpus() + [_random_unicode(rng, 400) for _ in range(60)]
    total = 0
    for i, text in enumerate(corpus):
        ours = hf.encode(text, add_special_tokens=False)
        theirs = enc.encode(text, allowed_special="all")
        assert ours == theirs, f"corpus item {i} ({text[:40]!r}...) tokenises differently"
        assert hf.decode(ours) == enc.decode(theirs) == text
        total += len(ours)
    assert total > 100_000  # the corpus is large enough to exercise most merge paths


def test_decode_matches_harmony_on_random_ids(tokenizers) -> None:
    hf, enc = tokenizers
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(VOCAB_SIZE) for _ in range(rng.randint(1, 30))]
        assert hf.decode(ids) == enc.decode(ids), ids
