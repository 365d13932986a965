"""Score nano on held-out tasks: harmony well-formedness, answer accuracy and reasoning length, per effort,
and accuracy per family.

``held_out_tasks`` draws from a seed range training never uses. ``score`` takes what a model wrote for each
task (reasoning text, reasoning token count, answer text, or a tool call) from any runner: vLLM in-process
here, or the running service through the ``openai`` client in the tests. The built-in tool families run
their whole conversation (``vllm_converser``): each call the model makes is answered by the real tools (the
sandbox, the browser over an index of the task's collection), as the Responses loop does.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gptoss_vllm.nano.conversations import chat_messages, encode_text, prompt_ids
from gptoss_vllm.nano.tasks import ALL_FAMILIES, BUILTIN_FAMILIES, Task, make_task, own_tool

HELD_OUT_SEED = 1_000_003


def held_out_tasks(
    per_family: int, seed: int = HELD_OUT_SEED, families: tuple[str, ...] = ALL_FAMILIES
) -> list[Task]:
    rng = random.Random(seed)
    return [make_task(rng, family) for family in families for _ in range(per_family)]


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
    families: dict[str, float] | None = None  # accuracy per family


@dataclass(frozen=True)
class Conversed:
    """A built-in tool task's whole conversation: its turns together, and the answer it should end with."""

    turn: Turn
    expected: str


Request = tuple[Task, str, bool]  # task, effort, after the tool answered
Runner = Callable[[list[Request]], list[Turn]]
Converser = Callable[[list[tuple[Task, str]]], list[Conversed]]


def right(task: Task, answer: str | None, expected: str) -> bool:
    """Whether a built-in tool task's answer is right: the sum python printed; what the run gave; the fact
    with the page it came from (its URL)."""
    if answer is None:
        return False
    if task.family == "browser":
        assert task.fact is not None
        url = expected.rsplit(", ", 1)[-1].rstrip(").")
        return task.fact.when in answer and url in answer
    return answer.strip() == expected


def score(
    tasks: list[Task], efforts: tuple[str, ...], run: Runner, converse: Converser | None = None
) -> list[EffortScore]:
    """Each task at each effort; a lookup needs the right call, then the right answer in the follow-up; a
    built-in tool task (through ``converse``) its whole conversation."""
    builtin = [(task, effort) for effort in efforts for task in tasks if task.family in BUILTIN_FAMILIES]
    if builtin and converse is None:
        raise ValueError("built-in tool tasks need a converser")
    conversed = dict(zip([(id(t), e) for t, e in builtin], converse(builtin) if builtin else [], strict=True))
    tasks_chat = [task for task in tasks if task.family not in BUILTIN_FAMILIES]
    first_requests = [(task, effort, False) for effort in efforts for task in tasks_chat]
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
        correct: dict[str, list[bool]] = {}
        for (task, e, _), turn in zip(first_requests, first, strict=True):
            if e != effort:
                continue
            turns.append(turn)
            if task.family == "lookup":
                second = follow.get((id(task), effort))
                if second is not None:
                    turns.append(second)
                ok = second is not None and second.answer is not None and second.answer.strip() == task.answer
            else:
                ok = turn.answer is not None and turn.answer.strip() == task.answer
            correct.setdefault(task.family, []).append(ok)
        for task, e in builtin:
            if e == effort:
                done = conversed[(id(task), effort)]
                turns.append(done.turn)
                correct.setdefault(task.family, []).append(right(task, done.turn.answer, done.expected))
        scores.append(
            EffortScore(
                effort,
                len(tasks),
                sum(t.parsed for t in turns) / len(turns),
                sum(sum(v) for v in correct.values()) / len(tasks),
                sum(t.reasoning_tokens for t in turns) / len(turns),
                {family: sum(v) / len(v) for family, v in correct.items()},
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
    families = [
        f for f in ALL_FAMILIES if any(s.families and f in s.families for r in scores.values() for s in r)
    ]
    lines = [
        f"{'model':<8} {'effort':<7} {'tasks':>5} {'harmony':>8} {'accuracy':>9} {'reasoning tokens':>17}"
        + "".join(f" {f:>8}" for f in families)
    ]
    for name, rows in scores.items():
        for s in rows:
            by_family = "".join(f" {(s.families or {}).get(f, 0.0):>8.0%}" for f in families)
            lines.append(
                f"{name:<8} {s.effort:<7} {s.tasks:>5} {s.parsed:>8.1%} {s.accuracy:>9.1%} "
                f"{s.mean_reasoning_tokens:>17.1f}{by_family}"
            )
    return "\n".join(lines)


def vllm_converser(llm: Any, date: str = "2026-11-29", rounds: int = 4) -> Converser:
    """Greedy decoding of built-in tool conversations with a vLLM ``LLM``: each call the model makes is
    answered by the real tools and the history re-rendered by vLLM, until it answers (or ``rounds`` ends)."""
    from vllm import SamplingParams
    from vllm.entrypoints.openai.parser.harmony_utils import (
        get_streamable_parser_for_assistant,
        render_for_completion,
    )

    from gptoss_vllm.nano.builtin_tools import Toolbox, Transcript, script

    stops = [encode_text("<|return|>")[0], encode_text("<|call|>")[0]]
    params = SamplingParams(temperature=0.0, max_tokens=256, stop_token_ids=stops, skip_special_tokens=False)

    def converse(requests: list[tuple[Task, str]]) -> list[Conversed]:
        toolbox = Toolbox(real=True)
        tools = {t.family: (own_tool(t.family),) for t, _ in requests}
        expected = [script(t, e, tools[t.family], date, toolbox).answer for t, e in requests]
        for task, _ in requests:
            toolbox.forget(task)  # the model's conversation opens its pages afresh
        histories = [Transcript(t.user, e, tools[t.family], date).messages for t, e in requests]
        reasoning = [0] * len(requests)
        answers: list[str | None] = [None] * len(requests)
        active = list(range(len(requests)))
        for _ in range(rounds):
            if not active:
                break
            prompts = [{"prompt_token_ids": render_for_completion(histories[i])} for i in active]
            outputs = llm.generate(prompts, params, use_tqdm=False)
            going = []
            for i, output in zip(active, outputs, strict=True):
                parser = get_streamable_parser_for_assistant()
                try:
                    for token in output.outputs[0].token_ids:
                        parser.process(token)
                except Exception:  # not harmony: the conversation ends unparsed
                    continue
                written = parser.messages
                reasoning[i] += sum(
                    len(encode_text(m.content[0].text))
                    for m in written
                    if m.channel == "analysis" and not m.recipient
                )
                histories[i] += written
                last = written[-1] if written else None
                if (
                    last is not None
                    and last.recipient
                    and last.recipient.split(".")[0] in ("python", "browser")
                ):
                    try:
                        messages, _ = toolbox.answer(requests[i][0], last)
                    except (ValueError, KeyError):
                        continue
                    histories[i] += messages
                    going.append(i)
                elif last is not None and last.channel == "final" and not last.recipient:
                    answers[i] = "".join(c.text for c in last.content)
            active = going
        return [
            Conversed(Turn(answers[i] is not None, reasoning[i], answer=answers[i]), expected[i])
            for i in range(len(requests))
        ]

    return converse


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
            return score(held_out_tasks(per_family), EFFORTS, vllm_runner(llm), vllm_converser(llm))
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
