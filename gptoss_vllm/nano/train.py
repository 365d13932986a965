"""Train nano from scratch on CPU: transformers' gpt-oss model over a sub-vocabulary, MXFP4-aware at the end.

The model is ``GptOssForCausalLM`` with the nano preset (sinks, alternating sliding/full attention, YaRN,
top-k MoE) but only the embedding and unembedding rows of the ~1.3k tokens the data uses. After expansion to
the full 201088-token vocabulary every other token has a zero embedding row and a zero unembedding row, i.e. a
logit of exactly 0, so the loss counts them as one extra class of logit 0 with their multiplicity: training
pushes the right token's logit far above all of them. The last part of training runs the experts through
MXFP4 quantise-dequantise (straight-through gradients), so the quantised model is the one that was trained.
Its starting point helps it copy tokens, read digits and add them within the budget: number tokens start as
sums of place-value vectors whose digits share value and angle directions (``place_value_embeddings``), and
the unembedding starts equal to the embedding.
Steps run the model's parameters through ``forward.forward_logits`` (HF's math, several times faster).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from gptoss_vllm.checkpoints.config import build_config
from gptoss_vllm.nano.conversations import Example, sample_examples, vocabulary
from gptoss_vllm.nano.forward import forward_logits
from gptoss_vllm.quant import mxfp4

FULL_VOCAB = 201088
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 0
    steps: int = 1300  # the committed asset's recipe
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 60
    qat_fraction: float = 0.25  # the last quarter trains through MXFP4 experts
    micro_batches: int = 2  # per step, cut by length (same gradient, less padding)
    place_value_init: bool = True  # number tokens start as the sum of their digits' place vectors
    digit_features: bool = True  # ... whose digits share value and angle directions (``_digit_features``)
    # The unembedding starts equal to the embedding (they train apart, as gpt-oss's are untied): copying a
    # token from the prompt is then one map to learn for every token, not one per token. With it (and the
    # operands restated at every effort) the restated operands went from 0-5% to 98% right.
    tied_init: bool = True
    threads: int = 0  # 0: torch's default


@dataclass
class TrainResult:
    model: Any
    vocab: list[int]
    settings: TrainSettings
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def nano_hf_config(vocab_size: int) -> Any:
    from transformers import GptOssConfig

    config = build_config("nano")
    config = {**config, "vocab_size": vocab_size, "pad_token_id": None, "eos_token_id": None}
    hf = GptOssConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    hf._attn_implementation = "eager"
    return hf


def _fake_mxfp4(weight: torch.Tensor) -> torch.Tensor:
    """Quantise-dequantise an HF expert tensor (E, in, out) along its contraction dim, straight-through."""
    with torch.no_grad():
        blocks, scales = mxfp4.quantize(weight.detach().transpose(1, 2).float())
        snapped = mxfp4.dequantize(blocks, scales, torch.float32).transpose(1, 2)
    return weight + (snapped - weight).detach()


class quantised_experts:  # a context manager, named like one
    """Swaps each experts module's weights for their MXFP4 images during a forward (straight-through)."""

    def __init__(self, model: Any) -> None:
        self._experts = [m for m in model.modules() if type(m).__name__ == "GptOssExperts"]

    def __enter__(self) -> None:
        self._saved = []
        for module in self._experts:
            saved = {}
            for name in EXPERT_PARAMS:
                param = module._parameters.pop(name)
                saved[name] = param
                setattr(module, name, _fake_mxfp4(param))
            self._saved.append(saved)

    def __exit__(self, *exc: object) -> None:
        for module, saved in zip(self._experts, self._saved, strict=True):
            for name, param in saved.items():
                delattr(module, name)
                module._parameters[name] = param


def _digit_features(hidden: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """(place, digit, hidden): each place's digits laid on a few shared directions by value: ``d`` itself and
    the angles ``2 pi k d / 10``. A column sum is then a sum of values, its carry a threshold on it and its
    last digit a rotation, the same few maps for every pair of digits instead of a table of 100 facts."""
    digits = torch.arange(10, dtype=torch.float32)
    angles = [2 * math.pi * k * digits / 10 for k in (1, 2)]
    values = torch.stack([digits / 4.5 - 1, *(f(a) for a in angles for f in (torch.cos, torch.sin))], dim=-1)
    directions = torch.randn(3, values.shape[-1], hidden, generator=generator) * std
    return torch.einsum("dv,pvh->pdh", values, directions)


def place_value_embeddings(model: Any, vocab: list[int], seed: int, digit_features: bool = False) -> int:
    """Start the embedding of every number token (``7``, ``47``, ``473``) as the sum of one random vector per
    (place, digit), so that ``47`` and ``4``, ``7`` share features from the first step. Returns how many rows
    were set.

    o200k writes a number as runs of up to three digits, each run one token: nothing in a random embedding
    says that ``47`` holds a 4 and a 7. Reading a digit out of a number restated just before was right 93-97%
    of the time after 500 steps of additions alone with this start, 75-82% without it. With
    ``digit_features`` the place vectors also share value and angle directions (``_digit_features``)."""
    from gptoss_vllm.nano.conversations import decode_token

    std = model.config.initializer_range
    generator = torch.Generator().manual_seed(seed)
    places = torch.randn(3, 10, model.config.hidden_size, generator=generator) * std
    if digit_features:
        places += _digit_features(model.config.hidden_size, std, generator)
    weight = model.model.embed_tokens.weight
    count = 0
    with torch.no_grad():
        for row, token in enumerate(vocab):
            text = decode_token(token)
            if text.isascii() and text.isdigit() and len(text) <= 3:
                digits = [int(d) for d in reversed(text)]  # ones first
                weight[row] = sum(places[place, d] for place, d in enumerate(digits)) / len(digits) ** 0.5
                count += 1
    return count


def batch_tensors(
    examples: list[Example], to_sub: dict[int, int], pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids and labels (-100 outside the completions)."""
    length = max(len(e.tokens) for e in examples)
    ids = torch.full((len(examples), length), pad, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    for row, example in enumerate(examples):
        sub = torch.tensor([to_sub[t] for t in example.tokens])
        ids[row, : len(sub)] = sub
        labels[row, example.completion_start : len(sub)] = sub[example.completion_start :]
    return ids, labels


def loss_with_unseen_tokens(logits: torch.Tensor, labels: torch.Tensor, unseen: int) -> torch.Tensor:
    """Summed next-token cross-entropy where ``unseen`` more tokens all have logit 0 (their expanded rows are
    zero)."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    extra = torch.full((*logits.shape[:-1], 1), math.log(unseen), dtype=logits.dtype)
    full = torch.cat([logits, extra], dim=-1)
    return F.cross_entropy(
        full.reshape(-1, full.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
    )


def by_length(examples: list[Example], parts: int) -> list[list[Example]]:
    """``examples`` cut into ``parts`` micro-batches of similar lengths (less padding to compute)."""
    ordered = sorted(examples, key=lambda e: len(e.tokens))
    size = math.ceil(len(ordered) / parts)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def train(settings: TrainSettings, progress: bool = True) -> TrainResult:
    from transformers import GptOssForCausalLM

    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    vocab = vocabulary()
    to_sub = {token: i for i, token in enumerate(vocab)}
    pad = to_sub[vocab[0]]
    model = GptOssForCausalLM(nano_hf_config(len(vocab)))
    if settings.place_value_init:
        place_value_embeddings(model, vocab, settings.seed, settings.digit_features)
    if settings.tied_init:
        with torch.no_grad():
            model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.01)
    qat_from = int(settings.steps * (1 - settings.qat_fraction))
    unseen = FULL_VOCAB - len(vocab)

    def lr_at(step: int) -> float:
        if step < settings.warmup:
            return settings.lr * (step + 1) / settings.warmup
        done = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return settings.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * done)))

    result = TrainResult(model, vocab, settings)
    quantised = quantised_experts(model)
    started = time.monotonic()
    bar = tqdm(range(settings.steps), desc="training nano", unit="step", disable=not progress)
    for step in bar:
        examples: list[Example] = []
        while len(examples) < settings.batch_size:
            examples += sample_examples(rng)
        # Each step's batch is mixed across families; its gradient is accumulated over micro-batches of
        # similar lengths, which is the whole batch's gradient with less padding. (Cutting the *batches*
        # by length made each step one family, and training much worse: near-zero accuracy.)
        parts = [
            batch_tensors(part, to_sub, pad)
            for part in by_length(examples[: settings.batch_size], settings.micro_batches)
        ]
        targets = sum(int((labels[:, 1:] != -100).sum()) for _, labels in parts)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = 0.0
        with quantised if step >= qat_from else contextlib.nullcontext():
            for ids, labels in parts:
                part = loss_with_unseen_tokens(forward_logits(model, ids), labels, unseen) / targets
                part.backward()
                loss += part.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}", qat="on" if step >= qat_from else "off")
    result.seconds = time.monotonic() - started
    model.eval()
    return result


def asset_tensors(model: Any, vocab: list[int], quantise: bool = True) -> dict[str, torch.Tensor]:
    """The asset's tensors: non-expert weights in bf16, experts as MXFP4 blocks/scales (or bf16 masters)."""
    tensors: dict[str, torch.Tensor] = {"vocab_ids": torch.tensor(vocab, dtype=torch.int64)}
    for name, param in model.state_dict().items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in EXPERT_PARAMS and quantise:
            blocks, scales = mxfp4.quantize(param.detach().transpose(1, 2).float())
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
        else:
            tensors[name] = param.detach().to(torch.bfloat16).contiguous()
    return tensors


def save_asset(result: TrainResult, path: Path, extra: dict[str, Any]) -> Path:
    """Write the sub-vocabulary weights (experts as MXFP4 blocks/scales) and what produced them."""
    from safetensors.torch import save_file

    metadata = {
        "settings": json.dumps(result.settings.__dict__),
        "train_seconds": json.dumps(round(result.seconds)),
        "final_loss": json.dumps(round(sum(result.losses[-50:]) / max(1, len(result.losses[-50:])), 4)),
        **{k: json.dumps(v) for k, v in extra.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(asset_tensors(result.model, result.vocab), str(path), metadata=metadata)
    return path
