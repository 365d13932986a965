"""Score nano on held-out tasks: harmony well-formedness, answer accuracy and reasoning length, per effort.

``held_out_tasks`` draws from a seed range training never uses. ``score`` takes what a model wrote for each
task (reasoning text, reasoning token count, answer text, or a tool call) from any runner: transformers
in-process here, or the running service through the ``openai`` client in the tests.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gptoss_vllm.nano.conversations import chat_messages, encode_text, prompt_ids
from gptoss_vllm.nano.tasks import FAMILIES, Task, make_task

HELD_OUT_SEED = 1_000_003


def held_out_tasks(per_family: int, seed: int = HELD_OUT_SEED) -> list[Task]:
    rng = random.Random(seed)
    return [make_task(rng, family) for family in FAMILIES for _ in range(per_family)]


@dataclass(frozen=True)
class Turn:
    """One assistant turn as parsed from harmony: reasoning, then an answer or a tool call."""

    parsed: bool
    reasoning_tokens: int = 0
    answer: str | None = None
    tool_key: str | None = None


@dataclass(frozen=True)
class EffortScore:
    effort: str
    tasks: int
    parsed: float
    accuracy: float
    mean_reasoning_tokens: float


Request = tuple[Task, str, bool]  # task, effort, after the tool answered
Runner = Callable[[list[Request]], list[Turn]]


def score(tasks: list[Task], efforts: tuple[str, ...], run: Runner) -> list[EffortScore]:
    """Each task at each effort; a lookup needs the right call, then the right answer in the follow-up."""
    first_requests = [(task, effort, False) for effort in efforts for task in tasks]
    first = run(first_requests)
    follow_requests = [
        (task, effort, True)
        for (task, effort, _), turn in zip(first_requests, first, strict=True)
        if task.family == "lookup" and turn.tool_key == task.key
    ]
    follow = dict(zip([(id(t), e) for t, e, _ in follow_requests], run(follow_requests), strict=True))
    scores = []
    for effort in efforts:
        turns: list[Turn] = []
        correct = 0
        for (task, e, _), turn in zip(first_requests, first, strict=True):
            if e != effort:
                continue
            turns.append(turn)
            if task.family == "lookup":
                second = follow.get((id(task), effort))
                if second is not None:
                    turns.append(second)
                    correct += second.answer is not None and second.answer.strip() == task.answer
            else:
                correct += turn.answer is not None and turn.answer.strip() == task.answer
        scores.append(
            EffortScore(
                effort,
                len(tasks),
                sum(t.parsed for t in turns) / len(turns),
                correct / len(tasks),
                sum(t.reasoning_tokens for t in turns) / len(turns),
            )
        )
    return scores


def parse_harmony(text: str) -> Turn:
    """Parse what follows ``<|start|>assistant`` in the model's raw output."""
    head = "<|channel|>analysis<|message|>"
    if not text.startswith(head) or "<|end|>" not in text:
        return Turn(False)
    reasoning, rest = text[len(head) :].split("<|end|>", 1)
    reasoning_tokens = len(encode_text(reasoning))
    final = "<|start|>assistant<|channel|>final<|message|>"
    call = "<|start|>assistant<|channel|>commentary to=functions.lookup <|constrain|>json<|message|>"
    if rest.startswith(final) and rest.endswith("<|return|>"):
        return Turn(True, reasoning_tokens, answer=rest[len(final) : -len("<|return|>")])
    if rest.startswith(call) and rest.endswith("<|call|>"):
        try:
            key = json.loads(rest[len(call) : -len("<|call|>")]).get("key")
        except (ValueError, AttributeError):
            return Turn(False, reasoning_tokens)
        return Turn(True, reasoning_tokens, tool_key=key)
    return Turn(False, reasoning_tokens)


def vllm_runner(llm: Any, date: str = "2026-11-29") -> Runner:
    """Greedy decoding with a vLLM ``LLM`` on prompts rendered exactly as the chat endpoint renders them."""
    from vllm import SamplingParams

    from gptoss_vllm.nano.conversations import _encoding

    stops = [encode_text("<|return|>")[0], encode_text("<|call|>")[0]]
    params = SamplingParams(temperature=0.0, max_tokens=256, stop_token_ids=stops, skip_special_tokens=False)

    def run(requests: list[Request]) -> list[Turn]:
        if not requests:
            return []
        prompts = [
            {"prompt_token_ids": prompt_ids(chat_messages(t, after), e, t.family == "lookup", date)}
            for t, e, after in requests
        ]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return [parse_harmony(_encoding().decode(list(o.outputs[0].token_ids))) for o in outputs]

    return run


def format_table(scores: dict[str, list[EffortScore]]) -> str:
    lines = [
        f"{'model':<8} {'effort':<7} {'tasks':>5} {'harmony':>8} {'accuracy':>9} {'reasoning tokens':>17}"
    ]
    for name, rows in scores.items():
        for s in rows:
            lines.append(
                f"{name:<8} {s.effort:<7} {s.tasks:>5} {s.parsed:>8.1%} {s.accuracy:>9.1%} {s.mean_reasoning_tokens:>17.1f}"
            )
    return "\n".join(lines)


def evaluate_weights(asset: dict, dtype: str, per_family: int) -> list[EffortScore]:
    """Expand asset-shaped weights into a temporary checkpoint and score it with vLLM (greedy)."""
    import gc
    import tempfile
    from pathlib import Path

    from vllm import LLM

    from gptoss_vllm.checkpoints.builder import write_checkpoint
    from gptoss_vllm.nano.asset import expanded_tensors, nano_config
    from gptoss_vllm.nano.tasks import EFFORTS

    config = nano_config()
    with tempfile.TemporaryDirectory(prefix="nano-eval-") as tmp:
        checkpoint = write_checkpoint(
            Path(tmp) / "nano",
            config,
            dtype=dtype,
            progress=False,
            tensors=expanded_tensors(config, dtype, asset),
        )
        # A fixed 1 GiB KV cache: the default reserves a fraction of all CPU memory and refuses to start
        # when other processes hold some of it (which, after a long training run, loses the run).
        llm = LLM(
            model=str(checkpoint),
            enforce_eager=True,
            max_model_len=2048,
            seed=0,
            kv_cache_memory_bytes=1 << 30,
        )
        try:
            return score(held_out_tasks(per_family), EFFORTS, vllm_runner(llm))
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
