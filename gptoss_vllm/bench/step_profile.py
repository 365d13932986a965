"""Where one decode step's time goes: forward hooks inside vLLM's worker, split by part of the model.

``install`` and ``collect`` run in the worker (``LLM.collective_rpc`` hands them the worker). Each forward of
the whole model opens a step; the time between the starts of two consecutive steps is the step's period, so
whatever the period holds beyond the model, lm_head and sampler is the engine's own work (scheduling, input
preparation, output processing, the front end's turn). The parts:

- ``experts``: the MoE experts (the plugin's ``MXFP4Experts``, or vLLM's ``FusedMoE`` on ``native``);
- ``router``: the MoE router linear and its top-k;
- ``attention``: the attention module (qkv and o linears, rope, the attention kernel and its KV writes),
  with ``attention_linears`` the share of it spent in the qkv and o linears;
- ``model_other``: the rest of the model's forward (embedding, norms, residuals);
- ``lm_head``: the logits (vLLM's ``LogitsProcessor``);
- ``sampling``: vLLM's sampler;
- ``engine``: the period less all of the above.

The hooks add a few microseconds per module call; on a step of tens of milliseconds that is noise.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from typing import Any

PARTS = ("experts", "router", "attention", "model_other", "lm_head", "sampling", "engine")
_MODULE_PARTS = (
    (re.compile(r"layers\.\d+\.mlp\.experts$"), "experts"),
    (re.compile(r"layers\.\d+\.mlp\.router$"), "router"),
    (re.compile(r"layers\.\d+\.attn$"), "attention"),
    (re.compile(r"layers\.\d+\.attn\.(qkv_proj|o_proj)$"), "attention_linears"),
    (re.compile(r"^logits_processor$"), "lm_head"),
)


class _Recorder:
    """Per-step sums of each part's time, in the worker."""

    def __init__(self) -> None:
        self.starts: list[float] = []  # each step's start (the model forward's pre-hook)
        self.steps: list[dict[str, float]] = []
        self.open: dict[str, float] = {}
        self.handles: list[Any] = []

    def enter(self, part: str) -> None:
        self.open[part] = time.perf_counter()

    def leave(self, part: str) -> None:
        if self.steps and part in self.open:
            self.steps[-1][part] += time.perf_counter() - self.open.pop(part)

    def new_step(self) -> None:
        self.starts.append(time.perf_counter())
        self.steps.append(defaultdict(float))
        self.enter("forward")


_RECORDER: _Recorder | None = None


def _hook(module: Any, part: str, recorder: _Recorder) -> None:
    recorder.handles.append(module.register_forward_pre_hook(lambda *_: recorder.enter(part)))
    recorder.handles.append(module.register_forward_hook(lambda *_: recorder.leave(part)))


def install(worker: Any) -> int:
    """Hook the worker's model and sampler; returns how many modules are timed."""
    global _RECORDER
    remove(worker)
    recorder = _RECORDER = _Recorder()
    runner = worker.model_runner
    model = runner.model
    recorder.handles.append(model.register_forward_pre_hook(lambda *_: recorder.new_step()))
    recorder.handles.append(model.register_forward_hook(lambda *_: recorder.leave("forward")))
    timed = 0
    for name, module in model.named_modules():
        part = next((part for pattern, part in _MODULE_PARTS if pattern.search(name)), None)
        if part:
            _hook(module, part, recorder)
            timed += 1
    _hook(runner.sampler, "sampling", recorder)
    return timed + 1


def remove(worker: Any) -> None:
    """Take the hooks off (the model runs as before)."""
    global _RECORDER
    if _RECORDER is not None:
        for handle in _RECORDER.handles:
            handle.remove()
    _RECORDER = None


def collect(worker: Any, skip: int = 1) -> dict[str, float]:
    """Mean seconds per step of each part over the recorded steps, less the first ``skip`` (the prefill) and
    the last (whose period has no end); ``steps`` says how many were averaged."""
    recorder = _RECORDER
    if recorder is None or len(recorder.steps) < skip + 2:
        raise RuntimeError("the step profile recorded too few steps: install it, then run a few decode steps")
    steps = range(skip, len(recorder.steps) - 1)
    mean: dict[str, float] = defaultdict(float)
    for i in steps:
        step = recorder.steps[i]
        period = recorder.starts[i + 1] - recorder.starts[i]
        inner = step["experts"] + step["router"] + step["attention"]
        mean["period"] += period
        mean["forward"] += step["forward"]
        for part in ("experts", "router", "attention", "attention_linears", "lm_head", "sampling"):
            mean[part] += step[part]
        mean["model_other"] += step["forward"] - inner
        mean["engine"] += period - step["forward"] - step["lm_head"] - step["sampling"]
    return {part: value / len(steps) for part, value in mean.items()} | {"steps": len(steps)}


def summarize(mean: dict[str, float], bytes_by_part: dict[str, float] | None = None) -> dict[str, Any]:
    """Milliseconds and share of the step per part, and the read rate of the parts whose bytes are known."""
    period = mean["period"]
    out: dict[str, Any] = {"step_ms": round(period * 1e3, 2), "steps": int(mean["steps"]), "parts": {}}
    for part in PARTS:
        entry: dict[str, float] = {"ms": round(mean[part] * 1e3, 2), "share": round(mean[part] / period, 3)}
        if bytes_by_part and bytes_by_part.get(part) and mean[part] > 0:
            entry["read_gbps"] = round(bytes_by_part[part] / mean[part] / 1e9, 1)
        out["parts"][part] = entry
    out["attention_linears_ms"] = round(mean["attention_linears"] * 1e3, 2)
    return out
