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
from gptoss_vllm.nano import NanoError
from gptoss_vllm.nano.conversations import Example, sample_examples, vocabulary
from gptoss_vllm.nano.forward import forward_logits
from gptoss_vllm.quant import mxfp4

FULL_VOCAB = 201088
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 0
    steps: int = 1300  # the committed asset's recipe
    batch_size: int = 20  # 16 of the chat families' examples, as before the built-in tools, and 4 of theirs
    lr: float = 3e-3
    warmup: int = 60
    qat_fraction: float = 0.25  # the last quarter trains through MXFP4 experts
    micro_batches: int = 6  # per step, cut by length (same gradient, less padding)
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
    resumed_at: int | None = None  # the step a checkpoint brought it to, when it resumed from one

    @property
    def finished(self) -> bool:
        return len(self.losses) == self.settings.steps


class TrainStateError(NanoError, RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the file and what differs."""


CHECKPOINT_FILE = "train-state.pt"


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
    """Right-padded token ids and labels (-100 outside what the model writes)."""
    length = max(len(e.tokens) for e in examples)
    ids = torch.full((len(examples), length), pad, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    for row, example in enumerate(examples):
        sub = torch.tensor([to_sub[t] for t in example.tokens])
        ids[row, : len(sub)] = sub
        for start, end in example.written:
            labels[row, start:end] = sub[start:end]
    return ids, labels


def loss_with_unseen_tokens(logits: torch.Tensor, labels: torch.Tensor, unseen: int) -> torch.Tensor:
    """Summed next-token cross-entropy where ``unseen`` more tokens all have logit 0 (their expanded rows are
    zero). ``logits`` are every position's, or (2-d) only those of the positions whose next token is labelled,
    in order."""
    if logits.dim() == 3:
        logits, target = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    else:
        target = labels[:, 1:][labels[:, 1:] != -100]
    logits = logits.float()
    extra = torch.full((logits.shape[0], 1), math.log(unseen), dtype=logits.dtype)
    return F.cross_entropy(torch.cat([logits, extra], dim=-1), target, ignore_index=-100, reduction="sum")


def by_length(examples: list[Example], parts: int) -> list[list[Example]]:
    """``examples`` cut into ``parts`` micro-batches of similar lengths (less padding to compute)."""
    ordered = sorted(examples, key=lambda e: len(e.tokens))
    size = math.ceil(len(ordered) / parts)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


class _Run:
    """One training run's state: the model, its optimizer and the data stream, saved and loaded as one."""

    def __init__(self, settings: TrainSettings) -> None:
        from transformers import GptOssForCausalLM

        self.settings = settings
        torch.manual_seed(settings.seed)
        self.rng = random.Random(settings.seed)
        self.vocab = vocabulary()
        self.to_sub = {token: i for i, token in enumerate(self.vocab)}
        self.pad = self.to_sub[self.vocab[0]]
        self.model = GptOssForCausalLM(nano_hf_config(len(self.vocab)))
        if settings.place_value_init:
            place_value_embeddings(self.model, self.vocab, settings.seed, settings.digit_features)
        if settings.tied_init:
            with torch.no_grad():
                self.model.lm_head.weight.copy_(self.model.model.embed_tokens.weight)
        self.model.train()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.01
        )
        self.qat_from = int(settings.steps * (1 - settings.qat_fraction))
        self.unseen = FULL_VOCAB - len(self.vocab)
        self.quantised = quantised_experts(self.model)
        self.result = TrainResult(self.model, self.vocab, settings)

    def lr_at(self, step: int) -> float:
        settings = self.settings
        if step < settings.warmup:
            return settings.lr * (step + 1) / settings.warmup
        done = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return settings.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * done)))

    def step(self, step: int) -> float:
        """One optimizer step; its loss."""
        settings = self.settings
        examples: list[Example] = []
        while len(examples) < settings.batch_size:
            examples += sample_examples(self.rng)
        # Each step's batch is mixed across families; its gradient is accumulated over micro-batches of
        # similar lengths, which is the whole batch's gradient with less padding. (Cutting the *batches*
        # by length made each step one family, and training much worse: near-zero accuracy.)
        parts = [
            batch_tensors(part, self.to_sub, self.pad)
            for part in by_length(examples[: settings.batch_size], settings.micro_batches)
        ]
        targets = sum(int((labels[:, 1:] != -100).sum()) for _, labels in parts)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        loss = 0.0
        with self.quantised if step >= self.qat_from else contextlib.nullcontext():
            for ids, labels in parts:
                # Logits only where a next token is labelled: the built-in tools' prompts are long, and the
                # unembedding of every prompt position was most of a step's work.
                at = F.pad(labels[:, 1:] != -100, (0, 1), value=False)
                logits = forward_logits(self.model, ids, at)
                part = loss_with_unseen_tokens(logits, labels, self.unseen) / targets
                part.backward()
                loss += part.item()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def save(self, directory: Path) -> None:
        """Everything the next step needs, written atomically (a stop while writing keeps the previous one)."""
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            "settings": self.settings.__dict__,
            "vocab": self.vocab,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": self.rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "losses": self.result.losses,
            "seconds": self.result.seconds,
        }
        partial = directory / f".{CHECKPOINT_FILE}.writing"
        torch.save(state, partial)
        partial.replace(directory / CHECKPOINT_FILE)

    def load(self, directory: Path) -> bool:
        """Go on from the checkpoint in ``directory``, if there is one made with the same settings."""
        path = directory / CHECKPOINT_FILE
        if not path.exists():
            return False
        try:
            state = torch.load(path, weights_only=False)
        except Exception as exc:
            raise TrainStateError(f"{path}: unreadable ({exc}); remove it to start over") from None
        saved = state["settings"]
        differs = {
            k: (saved.get(k), v)
            for k, v in self.settings.__dict__.items()
            if k != "threads" and saved.get(k) != v
        }
        if differs:
            listed = ", ".join(f"{k} {old!r} there, {new!r} now" for k, (old, new) in differs.items())
            raise TrainStateError(
                f"{path}: trained with other settings ({listed}); resume with them or remove it"
            )
        if state["vocab"] != self.vocab:
            raise TrainStateError(f"{path}: trained on another vocabulary (the task families changed)")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        self.result.losses, self.result.seconds = list(state["losses"]), state["seconds"]
        self.result.resumed_at = len(self.result.losses)
        return True


def train(
    settings: TrainSettings,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 100,
    until: int | None = None,
) -> TrainResult:
    """Train nano; with ``checkpoint_dir``, its state is saved every ``checkpoint_every`` steps, at the end and on
    Ctrl-C, and a run finds it there and goes on from it, to the same weights as a run never stopped. ``until``
    stops after that many steps (a result not :attr:`~TrainResult.finished`)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    run = _Run(settings)
    if checkpoint_dir is not None:
        run.load(checkpoint_dir)
    result = run.result
    started = time.monotonic() - result.seconds
    last = settings.steps if until is None else min(until, settings.steps)
    bar = tqdm(
        range(len(result.losses), last),
        initial=len(result.losses),
        total=settings.steps,
        desc="training nano",
        unit="step",
        disable=not progress,
    )
    try:
        for step in bar:
            loss = run.step(step)
            result.losses.append(loss)
            result.seconds = time.monotonic() - started
            bar.set_postfix(loss=f"{loss:.3f}", qat="on" if step >= run.qat_from else "off")
            if checkpoint_dir is not None and (step + 1) % checkpoint_every == 0:
                run.save(checkpoint_dir)
    except KeyboardInterrupt:
        if checkpoint_dir is not None:
            run.save(checkpoint_dir)
            print(f"\nstopped at step {len(result.losses)}; run again to go on from {checkpoint_dir}")
        raise
    if checkpoint_dir is not None:
        run.save(checkpoint_dir)
    run.model.eval()
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
