"""``gptoss-vllm bench e2e``: a whole gpt-oss model (gpt-oss-20b's shape by default) on this CPU, offline.

The checkpoint is the preset's published shape with seeded random weights and MXFP4 experts, built once into
the cache as ``builtin:<preset>`` is. Each implementation runs ``LLM(...)`` (``enforce_eager``) in a child
process of its own, one after another, so that every load starts from free memory; this process samples the
RSS of the child's whole tree (the engine core and its worker included) and keeps the peak per phase
(loading, prefill, decode).

- Prefill: one prompt of each length, one output token, warm (the best of two), in tokens/s.
- Decode: ``batch`` prompts of ``prompt_tokens``, ``output_tokens`` each with ``ignore_eos``; the decode
  time is the time of the whole outputs minus the time of their first tokens, in output tokens/s.
- Stock vLLM (plugins off) runs the same checkpoint and is recorded as what it does: its refusal or its figures.
- The batch-1 head-to-head with llama.cpp (``run_head_to_head``): after the full runs, rounds of our engine's
  batch-1 decode and llama-bench's tg, alternating, each side after a read probe. The batch-1 ratio is taken
  there, not between full runs a quarter of an hour apart.
- The roofline: the bytes a batch-1 decode token reads (the active experts in MXFP4, attention, router and
  lm_head in bf16), over a memory-read probe run in this process.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil
from tqdm import tqdm

from gptoss_vllm.bench import BenchmarkError
from gptoss_vllm.model.backend import ENV_VAR as BACKEND_ENV
from gptoss_vllm.serve.core_split import BIND_ENV

PHASES = ("convert", "loading", "prefill", "decode")  # convert: llama.cpp's GGUF conversion, when it runs
SAMPLE_S = 0.2  # seconds between two samples of a child's memory
MXFP4_BYTES_PER_VALUE = 17 / 32  # 32 4-bit values and one E8M0 scale byte per block


class BenchError(BenchmarkError, RuntimeError):
    """The bench cannot go on; the message says what to change."""


@dataclass(frozen=True)
class Settings:
    preset: str = "gpt-oss-20b"
    prefill_lengths: tuple[int, ...] = (512, 2048)
    batches: tuple[int, ...] = (1, 4, 16)
    prompt_tokens: int = 128
    output_tokens: int = 128
    kv_cache_gib: int = 0  # VLLM_CPU_KVCACHE_SPACE (whole GiB); 0: what ``context`` needs (at least 1)
    context: int = 0  # max_model_len; 0: what the prompts need
    stock: bool = True  # also run stock vLLM (plugins off) on the same checkpoint
    llama_cpp: bool = True  # also run llama.cpp on the same weights (built and converted into the cache once)
    profile_tokens: int = 32  # batch-1 decode steps the step profile averages over (0: no profile)
    rounds: int = 2  # the batch-1 head-to-head's rounds (``run_head_to_head``; 0: none)
    blocks: int = 3  # per round and side: timed batch-1 decodes of ours, llama-bench repetitions of its tg
    full_runs: bool = True  # False: the head-to-head alone
    timeout_s: float = 1800.0  # per child

    @property
    def longest(self) -> int:
        """The longest sequence the bench runs (a prompt and its outputs)."""
        return max(max(self.prefill_lengths) + 1, self.prompt_tokens + self.output_tokens)

    @property
    def max_model_len(self) -> int:
        return self.context or -(-self.longest // 256) * 256

    def resolved(self, config: dict[str, Any]) -> Settings:
        """With the KV cache sized for the context (vLLM refuses a max_model_len its cache cannot hold)."""
        limit = config.get("max_position_embeddings", self.max_model_len)
        if self.max_model_len > limit:
            raise BenchError(
                f"--context {self.max_model_len} is past the {self.preset} preset's {limit} positions"
            )
        if self.max_model_len < self.longest:
            raise BenchError(f"--context {self.max_model_len} is shorter than the bench's longest sequence "
                             f"({self.longest} tokens): raise it, or shorten --prefill or the decode lengths")  # fmt: skip
        need = kv_bytes_per_token(config) * self.max_model_len * 1.05  # and vLLM's block rounding
        return replace(self, kv_cache_gib=self.kv_cache_gib or max(1, math.ceil(need / 2**30)))


@dataclass
class Run:
    """One implementation's child process: what it measured and the peak RSS of its tree per phase."""

    impl: str
    backend: str
    measured: dict[str, Any] = field(default_factory=dict)
    peak_rss_gb: dict[str, float] = field(default_factory=dict)
    peak_by_process_gb: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> process -> its
    # own peak RSS (the worker holds the model; the front end and engine core hold vLLM's Python)
    peak_anon_gb: dict[str, float] = field(default_factory=dict)  # RSS less file-backed pages (the mmap'd
    # checkpoint is counted in RSS while it is read, and the kernel can drop it)
    refused: str | None = None


# --------------------------------------------------------------------------------------------- roofline
def _top_k(config: dict[str, Any]) -> int:
    return config.get("num_experts_per_tok") or config["experts_per_token"]


def decode_bytes_per_token(config: dict[str, Any]) -> dict[str, float]:
    """Bytes one batch-1 decode token reads from memory, by part (weights only: the KV of a short context is
    small beside them)."""
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    inter, experts = config["intermediate_size"], config["num_local_experts"]
    top_k = _top_k(config)
    heads, kv_heads, head_dim = (
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["head_dim"],
    )
    bf16 = 2
    expert_values = hidden * 2 * inter + inter * hidden
    expert_biases = (2 * inter + hidden) * bf16
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads) + (heads + 2 * kv_heads) * head_dim + hidden
    return {
        "experts": layers * top_k * (expert_values * MXFP4_BYTES_PER_VALUE + expert_biases),
        "attention": layers * (attention + heads) * bf16,  # with the sinks
        "router": layers * (hidden * experts + experts) * bf16,
        "lm_head": config["vocab_size"] * hidden * bf16,
    }


def kv_bytes_per_token(config: dict[str, Any]) -> int:
    """KV cache bytes per token in bf16 as vLLM's CPU cache holds it (every layer a full-length cache)."""
    return config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * config["head_dim"] * 2


# --------------------------------------------------------------------------------------------- checkpoint
def checkpoint_bytes(config: dict[str, Any]) -> float:
    """About what the preset's checkpoint takes on disk."""
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    per_token = decode_bytes_per_token(config)
    experts = per_token["experts"] * config["num_local_experts"] / _top_k(config)
    return experts + per_token["attention"] + per_token["router"] + 2 * per_token["lm_head"] + layers * hidden


def check_disk(folder: Path, need: float, what: str) -> None:
    """Raise ``BenchError`` naming what to change unless ``folder`` has ``need`` bytes free."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise BenchError(
            f"{what} needs about {need / 1e9:.1f} GB in {folder}, which has {free / 1e9:.1f} GB free: free some, "
            "or point GPTOSS_VLLM_CACHE at a larger disk"
        )


def ensure_checkpoint(preset: str) -> Path:
    """The preset's checkpoint in the cache, built (with a progress bar) unless it is there."""
    from gptoss_vllm.cache import cache_root
    from gptoss_vllm.checkpoints.config import build_config

    out = cache_root() / "models" / preset
    if not (out / ".gptoss-vllm-source").exists():  # written once a build is whole
        check_disk(
            out.parent, checkpoint_bytes(build_config(preset)) * 1.05, f"building the {preset} checkpoint"
        )
    # In a process of its own: building leaves this one's heap large, and the engines need the memory.
    built = subprocess.run([sys.executable, "-m", "gptoss_vllm.bench.e2e", "--build", preset], check=False)
    if built.returncode:
        raise BenchError(
            f"building the {preset} checkpoint into {out} failed (exit {built.returncode}): see above"
        )
    return out


# --------------------------------------------------------------------------------------------- children
def omp_threads_bind() -> str:
    """The cores each engine's worker computes on: ``VLLM_CPU_OMP_THREADS_BIND`` where set, else every core this
    process may use. vLLM's ``auto`` keeps one core for its front end and engine core, which offline only
    schedule between steps (about 1% of a batch-1 decode step): on 2 cores it would halve the worker's."""
    return os.environ.get(BIND_ENV) or ",".join(map(str, sorted(os.sched_getaffinity(0))))


def worker_threads() -> int:
    """How many cores each engine's worker computes on (llama.cpp gets as many threads)."""
    return len(omp_threads_bind().split(","))


def backends_here() -> list[str]:
    """The plugin's backends this CPU runs: ``cpu`` everywhere, ``native`` where ``auto`` picks it (AMX)."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUExpertsMxfp4

    return ["cpu", "native"] if CPUExpertsMxfp4._supports_current_device() else ["cpu"]


def _role(member: psutil.Process, root: psutil.Process) -> str:
    """Which of the engine's processes ``member`` is: the ``LLM`` front end, or the title vLLM gives it."""
    from gptoss_vllm.bench.overhead import process_title

    if member.pid == root.pid:  # the ``LLM`` process, or a tool of its own (llama.cpp's)
        with contextlib.suppress(psutil.Error):
            if not member.name().startswith("python"):
                return member.name()
        return "front_end"
    title = process_title(member)
    return next((role for role in ("EngineCore", "Worker") if role in title), "other")


def _tree_memory(proc: psutil.Process, by_role: dict[str, int]) -> tuple[int, int]:
    """RSS and anonymous RSS (RSS less shared, file-backed pages) of ``proc`` and its descendants; each role's
    peak RSS goes into ``by_role``."""
    rss = anon = 0
    try:
        family = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            info = member.memory_info()
            rss += info.rss
            anon += info.rss - getattr(info, "shared", 0)
            role = _role(member, proc)
            by_role[role] = max(by_role.get(role, 0), info.rss)
    return rss, anon


def _refusal(log: str) -> str:
    """The exception an engine's log gives for not starting (the last one, without the log prefix)."""
    errors = re.findall(r"\b((?:NotImplemented|Value|Runtime|BackendUnavailable)Error: .*)", log)
    errors = [e for e in errors if "Engine core initialization failed" not in e]
    if errors:
        return errors[-1].strip()[:400]
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return lines[-1][:400] if lines else "the engine exited without a word"


def watch(
    run: Run,
    argv: list[str],
    log_path: Path,
    phase: Callable[[], str],
    timeout_s: float,
    env: dict[str, str] | None = None,
    stdout: Path | None = None,
    lower: str = "",
) -> int:
    """Run ``argv`` in a session of its own, its tree's RSS sampled into ``run``'s peaks under the phase that
    ``phase()`` names (kept where ``run`` already has a higher one); returns its exit status. ``stdout`` goes to
    its own file where given (a tool's figures), else with stderr into ``log_path``. A child past ``timeout_s``,
    or killed (the OOM killer, a memcap), raises ``BenchError`` saying what to change (``lower``: a flag)."""
    what = f"{run.impl} ({run.backend})"
    by_role = {p: {} for p in PHASES}
    peaks, anon_peaks = dict.fromkeys(PHASES, 0), dict.fromkeys(PHASES, 0)
    with open(log_path, "a") as log, open(stdout or os.devnull, "w") as out:
        child = subprocess.Popen(
            argv, stdout=out if stdout else log, stderr=log, env=env, start_new_session=True
        )
        proc = psutil.Process(child.pid)
        deadline = time.monotonic() + timeout_s
        while child.poll() is None:
            now = phase()
            if now in peaks:
                rss, anon = _tree_memory(proc, by_role[now])
                peaks[now], anon_peaks[now] = max(peaks[now], rss), max(anon_peaks[now], anon)
            if time.monotonic() > deadline:
                os.killpg(child.pid, 9)
                child.wait()
                raise BenchError(f"{what} ran past {timeout_s:.0f} s; its log: {log_path}")
            time.sleep(SAMPLE_S)
    for p in PHASES:
        if peaks[p]:
            run.peak_rss_gb[p] = max(run.peak_rss_gb.get(p, 0), round(peaks[p] / 1e9, 2))
            run.peak_anon_gb[p] = max(run.peak_anon_gb.get(p, 0), round(anon_peaks[p] / 1e9, 2))
        roles = run.peak_by_process_gb.setdefault(p, {}) if by_role[p] else {}
        for role, peak in sorted(by_role[p].items()):
            roles[role] = max(roles.get(role, 0), round(peak / 1e9, 2))
    if child.returncode in (-9, 137):
        raise BenchError(
            f"{what} was killed (out of memory?) at {max(peaks.values()) / 1e9:.1f} GB of RSS: {lower}"
            f"stop what else holds memory, or raise the memcap; its log: {log_path}"
        )
    return child.returncode


def run_child(
    impl: str,
    backend: str,
    checkpoint: Path,
    settings: Settings,
    work: Path,
    mode: str = "full",
    one_process: bool = False,
) -> Run:
    """One vLLM implementation in a child process, its tree's RSS sampled per phase. ``mode``: ``full`` (prefill,
    decode at every batch, the step profile) or ``h2h<round>`` (batch-1 decode blocks only). ``one_process``:
    the engine core and worker in the ``LLM`` process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), not vLLM's
    default of three processes."""
    name = f"{impl}-{backend}" + ("" if mode == "full" else f".{mode}") + ("-1proc" if one_process else "")
    spec = work / f"{name}.spec.json"
    result, phase_file, log_path = (work / f"{name}.{s}" for s in ("result.json", "phase", "log"))
    spec.write_text(json.dumps({"checkpoint": str(checkpoint), "settings": asdict(settings), "result": str(result),
                                "phase": str(phase_file), "mode": mode}))  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gib), BIND_ENV: omp_threads_bind()}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if one_process else "1"
    if impl == "stock_vllm":
        env["VLLM_PLUGINS"] = "__none__"  # vLLM loads only the plugins named here: none of ours
        env.pop(BACKEND_ENV, None)
    else:
        env[BACKEND_ENV] = backend
        env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # the step profile's hooks go to the worker pickled
    run = Run(impl, backend)
    log_path.write_text("")
    returncode = watch(
        run,
        [sys.executable, "-m", "gptoss_vllm.bench.e2e", str(spec)],
        log_path,
        lambda: phase_file.read_text().strip() if phase_file.exists() else "loading",
        settings.timeout_s,
        env=env,
        lower="lower --kv-cache-gib, ",
    )
    if returncode == 0 and result.exists():
        run.measured = json.loads(result.read_text())
        return run
    text = log_path.read_text(errors="replace")
    if impl == "stock_vllm":
        run.refused = _refusal(text)
        return run
    raise BenchError(f"{impl} ({backend}) failed (exit {returncode}): {_refusal(text)}; its log: {log_path}")


def llama_cpp_gguf(checkpoint: Path, settings: Settings, run: Run, log_path: Path) -> Path:
    """llama.cpp built and ``checkpoint`` converted to GGUF, each into the cache unless it is there."""
    from gptoss_vllm.bench import llama_cpp

    try:
        llama_cpp.build()
        gguf = llama_cpp.gguf_path(checkpoint)
        if not gguf.exists():
            need = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")) * 1.05
            check_disk(gguf.parent, need, f"converting {checkpoint.name} to GGUF")
            partial = gguf.with_suffix(".partial")
            if watch(run, llama_cpp.convert_command(checkpoint, partial), log_path, lambda: "convert",
                     settings.timeout_s):  # fmt: skip
                raise BenchError(
                    f"llama.cpp's convert_hf_to_gguf.py failed on {checkpoint}; its log: {log_path}"
                )
            partial.rename(gguf)
    except llama_cpp.LlamaCppError as exc:
        raise BenchError(str(exc)) from exc
    return gguf


def run_llama_cpp(checkpoint: Path, settings: Settings, work: Path) -> Run:
    """llama.cpp on the same checkpoint (converted once to GGUF, MXFP4 experts): prefill and tg with
    ``llama-bench``, decode per batch with ``llama-batched-bench``, at the worker's thread count."""
    from gptoss_vllm.bench import llama_cpp

    run = Run("llama_cpp", "ggml-cpu")
    log_path = work / "llama_cpp.log"
    log_path.write_text("")
    gguf = llama_cpp_gguf(checkpoint, settings, run, log_path)
    threads = worker_threads()
    commands = llama_cpp.bench_commands(gguf, threads, settings)
    start = time.perf_counter()
    for name, phase, parse in (
        ("llama_bench", "prefill", llama_cpp.parse_llama_bench),
        ("batched_bench", "decode", llama_cpp.parse_batched_bench),
    ):
        out = work / f"llama_cpp.{name}.out"
        if watch(run, commands[name], log_path, lambda phase=phase: phase, settings.timeout_s, stdout=out):
            raise BenchError(f"llama.cpp's {name} failed: see {log_path} and {out}")
        run.measured.update(parse(out.read_text()))
    run.measured["bench_s"] = round(time.perf_counter() - start, 1)
    run.measured["threads"] = threads
    return run


H2H_SIDES = ("ours", "ours_one_process", "llama_cpp")


def run_head_to_head(checkpoint: Path, backend: str, settings: Settings, work: Path) -> dict[str, Any]:
    """Batch-1 decode of ours and llama.cpp's tg, alternating: ``settings.rounds`` rounds of three sides, each
    after a read probe, in the order of ``H2H_SIDES`` and reversed in every other round (so that a steady drift
    of the machine favours neither):

    - ``ours``: our engine as ``vllm serve`` runs it, in vLLM's three processes (front end, engine core, worker),
      loaded afresh, ``blocks`` timed decodes;
    - ``ours_one_process``: the same in one process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), as llama-bench runs;
      the difference is what vLLM's process split costs a token on this machine;
    - ``llama_cpp``: llama-bench's tg, ``blocks`` repetitions.

    The sides cannot be resident together (each holds the whole model), and this machine's read rate drifts over
    minutes: figures taken a quarter of an hour apart measure the machine as much as the code."""
    from gptoss_vllm.bench import llama_cpp
    from gptoss_vllm.bench.moe import probe_read_gbps

    llama = Run("llama_cpp", "ggml-cpu")
    log_path = work / "llama_cpp.h2h.log"
    log_path.write_text("")
    gguf = llama_cpp_gguf(checkpoint, settings, llama, log_path)
    threads = worker_threads()

    def measure(side: str, r: int) -> list[float]:
        if side != "llama_cpp":
            run = run_child("gptoss_vllm", backend, checkpoint, settings, work, f"h2h{r}", side != "ours")
            return run.measured["decode_b1_blocks_tok_s"]
        out = work / f"llama_cpp.h2h{r}.out"
        command = llama_cpp.tg_command(gguf, threads, settings.output_tokens, settings.blocks)
        if watch(llama, command, log_path, lambda: "decode", settings.timeout_s, stdout=out):
            raise BenchError(f"llama.cpp's llama-bench (tg) failed: see {log_path} and {out}")
        samples = llama_cpp.parse_tg_samples(out.read_text())
        if not samples:
            raise BenchError(f"llama-bench printed no tg samples: see {out}")
        return samples

    rounds = []
    for r in tqdm(range(settings.rounds), desc="batch-1 head-to-head", unit="round"):
        order = H2H_SIDES if r % 2 == 0 else H2H_SIDES[::-1]
        sides = {}
        for side in order:
            read = round(probe_read_gbps(), 1)
            sides[side] = {"read_gbps": read, "tok_s": measure(side, r)}
        rounds.append({"order": list(order), "sides": sides, **_ratios(sides)})
    pooled = {
        side: {"tok_s": [x for entry in rounds for x in entry["sides"][side]["tok_s"]]} for side in H2H_SIDES
    }
    return {
        "backend": backend,
        "tokens": settings.output_tokens,
        "rounds": rounds,
        "median_tok_s": {side: round(statistics.median(p["tok_s"]), 3) for side, p in pooled.items()},
        **_ratios(pooled),
    }


def _ratios(sides: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each of our sides' median over llama.cpp's median."""
    llama = statistics.median(sides["llama_cpp"]["tok_s"])
    return {
        "ratio": round(statistics.median(sides["ours"]["tok_s"]) / llama, 3),
        "ratio_one_process": round(statistics.median(sides["ours_one_process"]["tok_s"]) / llama, 3),
    }


def _child(spec_path: str) -> None:
    """In the child: load the engine, then time prefill and decode, writing the phase as it goes."""
    import random

    spec = json.loads(Path(spec_path).read_text())
    s = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["settings"].items()})
    phase = Path(spec["phase"])
    phase.write_text("loading")

    def enter(name: str) -> None:
        # Held past the parent's sampling period: a phase shorter than it (the tiny preset's prefill) would
        # otherwise have no sample at all.
        phase.write_text(name)
        time.sleep(3 * SAMPLE_S)

    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        model=spec["checkpoint"],
        enforce_eager=True,
        max_model_len=s.max_model_len,
        max_num_seqs=max(s.batches),
        max_num_batched_tokens=max(s.max_model_len, max(s.batches) * s.prompt_tokens),
        enable_prefix_caching=False,
        seed=0,
    )
    measured: dict[str, Any] = {"load_s": round(time.perf_counter() - start, 1)}
    rng = random.Random(0)

    def prompts(n: int, length: int) -> list[dict[str, list[int]]]:
        return [{"prompt_token_ids": [rng.randrange(1000, 100000) for _ in range(length)]} for _ in range(n)]

    def timed(batch: list[dict[str, list[int]]], tokens: int) -> float:
        params = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0.0)
        begin = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        elapsed = time.perf_counter() - begin
        assert all(len(o.outputs[0].token_ids) == tokens for o in outputs)
        return elapsed

    try:
        if spec["mode"] == "full":
            _measure_all(llm, s, timed, prompts, enter, measured)
        else:  # a head-to-head round: batch-1 decode alone
            enter("decode")
            timed(prompts(1, 64), 2)  # first-call costs out of the figures
            measured["decode_b1_blocks_tok_s"] = [
                _decode_tok_s(timed, prompts, 1, s) for _ in range(s.blocks)
            ]
    finally:
        llm.llm_engine.engine_core.shutdown()  # its worker would outlive us with the whole model
    Path(spec["result"]).write_text(json.dumps(measured))


def _measure_all(
    llm: Any, s: Settings, timed: Callable, prompts: Callable, enter: Callable, measured: dict[str, Any]
) -> None:
    """Prefill at each length, decode at each batch, and the batch-1 step profile, into ``measured``."""
    enter("prefill")
    timed(prompts(1, 64), 2)  # first-call costs out of the figures
    for length in s.prefill_lengths:
        best = min(timed(prompts(1, length), 1) for _ in range(2))
        measured[f"prefill{length}_tok_s"] = round(length / best, 2)
    enter("decode")
    for batch in s.batches:
        measured[f"decode_b{batch}_tok_s"] = _decode_tok_s(timed, prompts, batch, s)
    if s.profile_tokens:
        measured["decode_profile_b1"] = _profile_decode(llm, prompts(1, s.prompt_tokens), s.profile_tokens)


def _decode_tok_s(timed: Callable, prompts: Callable, batch: int, s: Settings) -> float:
    """Output tokens/s of ``batch`` sequences' decode: the whole outputs' time less their first tokens'."""
    first = timed(prompts(batch, s.prompt_tokens), 1)
    whole = timed(prompts(batch, s.prompt_tokens), s.output_tokens)
    return round(batch * (s.output_tokens - 1) / max(whole - first, 1e-9), 3)


def _profile_decode(llm: Any, prompt: list[dict[str, list[int]]], tokens: int) -> dict[str, float]:
    """Mean seconds per batch-1 decode step of each part (``step_profile``), hooks on only while measured."""
    from vllm import SamplingParams

    from gptoss_vllm.bench import step_profile

    llm.collective_rpc(step_profile.install)
    try:
        llm.generate(
            prompt, SamplingParams(max_tokens=tokens + 2, ignore_eos=True, temperature=0.0), use_tqdm=False
        )
        return llm.collective_rpc(step_profile.collect)[0]
    finally:
        llm.collective_rpc(step_profile.remove)


# --------------------------------------------------------------------------------------------- the bench
def rows(runs: list[Run], settings: Settings) -> list[dict[str, Any]]:
    """One row per implementation and batch, in the JSON's ``results`` shape."""
    out = []
    for run in runs:
        if run.refused is not None:
            continue
        for batch in settings.batches:
            row: dict[str, Any] = {"impl": run.impl, "backend": run.backend, "batch": batch}
            row["decode_tok_s"] = run.measured[f"decode_b{batch}_tok_s"]
            for length in settings.prefill_lengths:
                row[f"prefill{length}_tok_s"] = run.measured[f"prefill{length}_tok_s"]
            row["peak_rss_gb"] = max(run.peak_rss_gb.values())
            row["load_peak_rss_gb"] = run.peak_rss_gb.get("loading")
            row["decode_peak_rss_gb"] = run.peak_rss_gb.get("decode")
            row["load_peak_anon_gb"] = run.peak_anon_gb.get("loading")
            row["peak_rss_by_process_gb"] = run.peak_by_process_gb
            row["load_peak_worker_rss_gb"] = run.peak_by_process_gb.get("loading", {}).get("Worker")
            row["load_s"] = run.measured.get("load_s")
            row.update(
                {key: value for key, value in run.measured.items() if re.fullmatch(r"tg\d+_tok_s", key)}
            )
            out.append(row)
    return out


def run_bench(settings: Settings, json_path: str | None = None, keep: Path | None = None) -> dict[str, Any]:
    from gptoss_vllm.bench import step_profile
    from gptoss_vllm.bench.moe import probe_read_gbps
    from gptoss_vllm.bench.overhead import machine_info

    checkpoint = ensure_checkpoint(settings.preset)
    config = json.loads((checkpoint / "config.json").read_text())
    settings = settings.resolved(config)
    read_gbps = probe_read_gbps()
    per_token = decode_bytes_per_token(config)
    backends = backends_here()
    work = keep or Path(tempfile.mkdtemp(prefix="gptoss-bench-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    plan = [("gptoss_vllm", backend) for backend in backends]
    plan += [("stock_vllm", "native")] if settings.stock else []
    plan += [("llama_cpp", "ggml-cpu")] if settings.llama_cpp else []
    plan = plan if settings.full_runs else []
    runs = []
    for impl, backend in tqdm(plan, desc="bench e2e", unit="engine"):
        if impl == "llama_cpp":
            runs.append(run_llama_cpp(checkpoint, settings, work))
        else:
            runs.append(run_child(impl, backend, checkpoint, settings, work))
    head_to_head = None
    if settings.llama_cpp and settings.rounds:
        auto = backends[-1]  # what ``auto`` picks: native on AMX, else cpu
        head_to_head = run_head_to_head(checkpoint, auto, settings, work)
    stock = next((run for run in runs if run.impl == "stock_vllm"), None)
    report = {
        "machine": {
            **machine_info(),
            "read_gbps": round(read_gbps, 1),
            "omp_threads_bind": omp_threads_bind(),
        },
        "preset": settings.preset,
        "settings": {**asdict(settings), "max_model_len": settings.max_model_len},
        "results": rows(runs, settings),
        "decode_bytes_per_token": {part: round(b) for part, b in per_token.items()},
        "roofline_decode_tok_s": round(read_gbps * 1e9 / sum(per_token.values()), 2),
        "decode_profile_b1": {
            f"{run.impl} {run.backend}": step_profile.summarize(run.measured["decode_profile_b1"], per_token)
            for run in runs
            if "decode_profile_b1" in run.measured
        },
        "head_to_head_b1": head_to_head,
        "stock_vllm": "not run"
        if stock is None
        else (f"refused: {stock.refused}" if stock.refused else "ran"),
    }
    if keep is None:
        shutil.rmtree(work, ignore_errors=True)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_table(report: dict[str, Any]) -> str:
    s = report["settings"]
    prefill = [f"prefill{length}_tok_s" for length in s["prefill_lengths"]]
    head = [
        "impl",
        "backend",
        "batch",
        "decode tok/s",
        *(f"pp{length} tok/s" for length in s["prefill_lengths"]),
    ]
    head += ["load s", "load RSS GB", "load anon GB", "worker load GB", "decode RSS GB"]
    lines = ["  ".join(f"{h:>13}" for h in head)]
    for row in report["results"]:
        cells = [row["impl"], row["backend"], row["batch"], row["decode_tok_s"], *(row[k] for k in prefill)]
        cells += [
            row["load_s"],
            row["load_peak_rss_gb"],
            row["load_peak_anon_gb"],
            row["load_peak_worker_rss_gb"],
        ]
        cells += [row["decode_peak_rss_gb"]]
        lines.append("  ".join(f"{'-' if c is None else c!s:>13}" for c in cells))
    per_token = report["decode_bytes_per_token"]
    parts = ", ".join(f"{part} {b / 1e9:.3f}" for part, b in per_token.items())
    lines.append(
        f"roofline: {sum(per_token.values()) / 1e9:.3f} GB per batch-1 decode token ({parts}) at "
        f"{report['machine']['read_gbps']} GB/s read = {report['roofline_decode_tok_s']} tok/s"
    )
    seen = set()
    for row in report["results"]:
        if (row["impl"], row["backend"]) not in seen:
            seen.add((row["impl"], row["backend"]))
            each = "; ".join(
                f"{phase} " + ", ".join(f"{role} {gb}" for role, gb in roles.items())
                for phase, roles in row["peak_rss_by_process_gb"].items()
            )
            lines.append(f"peak RSS GB per process, {row['impl']} {row['backend']}: {each}")
            tg = {key: value for key, value in row.items() if re.fullmatch(r"tg\d+_tok_s", key)}
            if tg:
                figures = ", ".join(f"{key[:-6]} {value} tok/s" for key, value in tg.items())
                lines.append(f"llama-bench, {row['impl']}: {figures} (decode from an empty context)")
    for engine, profile in report.get("decode_profile_b1", {}).items():
        parts = ", ".join(
            f"{part} {p['ms']} ms ({p['share']:.0%}"
            + (f", {p['read_gbps']} GB/s)" if "read_gbps" in p else ")")
            for part, p in profile["parts"].items()
        )
        lines.append(
            f"batch-1 decode step, {engine}: {profile['step_ms']} ms = {parts}; qkv/o linears "
            f"{profile['attention_linears_ms']} ms of attention"
        )
    h2h = report.get("head_to_head_b1")
    if h2h:
        median = h2h["median_tok_s"]
        lines.append(
            f"batch-1 head-to-head, alternating ({h2h['backend']} against llama-bench tg{h2h['tokens']}, medians "
            f"over {len(h2h['rounds'])} rounds): ours {median['ours']} tok/s in vLLM's three processes "
            f"({h2h['ratio']}x llama.cpp), {median['ours_one_process']} in one ({h2h['ratio_one_process']}x), "
            f"llama.cpp {median['llama_cpp']}"
        )
        for i, entry in enumerate(h2h["rounds"]):
            each = ", ".join(
                f"{side} {entry['sides'][side]['tok_s']} (read {entry['sides'][side]['read_gbps']} GB/s)"
                for side in entry["order"]
            )
            lines.append(
                f"  round {i + 1}: {each}; {entry['ratio']}x, one process {entry['ratio_one_process']}x"
            )
    lines.append(f"stock vLLM: {report['stock_vllm']}")
    lines.append(f"{report['preset']} on {report['machine']['cpu']} ({report['machine']['cores']} cores)")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "--build":
        from gptoss_vllm.serve.pool.deployment import ensure_builtin_model

        ensure_builtin_model(f"builtin:{sys.argv[2]}")
    else:
        _child(sys.argv[1])
