"""llama.cpp beside the plugin in ``bench e2e``, on the same weights and the same cores.

- **The build:** the llama.cpp source vendored in the PyPI sdist of ``llama-cpp-python`` (``SDIST_VERSION``),
  fetched with pip, compiled with this machine's compiler for this CPU (``GGML_NATIVE``) into the cache, once
  per CPU: only ``llama-bench`` and ``llama-batched-bench``. Nothing of it is committed.
- **The conversion:** llama.cpp's own ``convert_hf_to_gguf.py``, the experts kept MXFP4 (it repacks the blocks),
  everything else bf16 as the plugin holds it (``--outtype bf16``), into the cache next to the checkpoint.
- **The timing:** ``llama-bench`` for prefill (``-p``) and tg128 (``-n``) and ``llama-batched-bench`` for decode
  at each batch (``-npp`` prompt tokens, ``-ntg`` output tokens, ``-npl`` sequences), at the thread count of the
  plugin's worker.

Every step runs in a child process whose tree's peak RSS is sampled like the vLLM engines' (``e2e.watch``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gptoss_vllm.bench import BenchmarkError

SDIST = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
TOOLS = ("llama-bench", "llama-batched-bench")


class LlamaCppError(BenchmarkError, RuntimeError):
    """A llama.cpp step failed; the message says which and where its log is."""


def _cpu_key() -> str:
    """A short digest of this CPU's model and flags: a ``-march=native`` build runs only where it was built."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    wanted = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    return hashlib.sha256("\n".join(wanted).encode()).hexdigest()[:12]


def home() -> Path:
    from gptoss_vllm.cache import cache_root

    return cache_root() / "llama.cpp" / SDIST_VERSION


def bin_dir() -> Path:
    return home() / f"build-{_cpu_key()}" / "bin"


def built() -> Path | None:
    """The folder holding this CPU's build of the tools, or None if it is not in the cache."""
    folder = bin_dir()
    return folder if all((folder / tool).exists() for tool in TOOLS) else None


def source() -> Path:
    """The vendored llama.cpp source, fetched from PyPI and extracted once."""
    src = home() / "src"
    if (src / "CMakeLists.txt").exists() and (src / "convert_hf_to_gguf.py").exists():
        return src
    home().mkdir(parents=True, exist_ok=True)
    fetched = subprocess.run(
        [sys.executable, "-m", "pip", "download", f"{SDIST}=={SDIST_VERSION}", "--no-binary", ":all:", "--no-deps",
         "-d", str(home()), "-q"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    archives = sorted(home().glob("llama_cpp_python-*.tar.gz"))
    if fetched.returncode or not archives:
        raise LlamaCppError(
            f"could not fetch the {SDIST}=={SDIST_VERSION} sdist from the package index into {home()}: "
            f"{fetched.stderr.strip()[-400:]}"
        )
    prefix = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"
    staging = home() / "src.partial"
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(archives[-1]) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(prefix) and len(m.name) > len(prefix)]
        for member in members:
            member.name = member.name[len(prefix) :]
        archive.extractall(staging, members=members, filter="data")
    shutil.rmtree(src, ignore_errors=True)
    staging.rename(src)
    return src


def build(progress: bool = True) -> Path:
    """Build this CPU's tools into the cache unless they are there; returns their folder."""
    folder = built()
    if folder:
        return folder
    if not shutil.which("cmake") or not (shutil.which("c++") or shutil.which("g++")):
        raise LlamaCppError("building llama.cpp needs cmake and a C++ compiler: apt-get install cmake g++")
    src = source()
    out = bin_dir().parent
    log_path = home() / f"build-{_cpu_key()}.log"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = [
        "cmake", "-S", str(src), "-B", str(out), *generator, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
        "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
        f"-DCMAKE_RUNTIME_OUTPUT_DIRECTORY={out / 'bin'}",
    ]  # fmt: skip
    jobs = str(len(os.sched_getaffinity(0)))
    compile_ = ["cmake", "--build", str(out), "--target", *TOOLS, "-j", jobs]
    with open(log_path, "w") as log:
        if subprocess.run(configure, stdout=log, stderr=subprocess.STDOUT, check=False).returncode:
            raise LlamaCppError(f"configuring llama.cpp failed: see {log_path}")
        bar = tqdm(desc="building llama.cpp", unit="step", disable=not progress)
        with subprocess.Popen(compile_, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            for line in proc.stdout:
                log.write(line)
                step = re.match(r"\[(\d+)/(\d+)\]", line)
                if step:
                    bar.total = int(step[2])
                    bar.n = int(step[1])
                    bar.refresh()
        bar.close()
    if proc.returncode or not built():
        raise LlamaCppError(f"building llama.cpp failed (exit {proc.returncode}): see {log_path}")
    return bin_dir()


def gguf_path(checkpoint: Path) -> Path:
    """Where ``checkpoint``'s GGUF is kept: named for its files' sizes and times, so a rebuilt checkpoint is
    converted again."""
    files = sorted(checkpoint.glob("*.safetensors"))
    stamp = "".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns};" for f in files)
    digest = hashlib.sha256(stamp.encode()).hexdigest()[:10]
    return home() / "gguf" / f"{checkpoint.name}-{digest}-mxfp4-bf16.gguf"


def convert_command(checkpoint: Path, out: Path) -> list[str]:
    return [sys.executable, str(source() / "convert_hf_to_gguf.py"), str(checkpoint), "--outfile", str(out),
            "--outtype", "bf16"]  # fmt: skip


def bench_commands(gguf: Path, threads: int, settings: Any) -> dict[str, list[str]]:
    """llama-bench (prefill at each length, tg at the decode length) and llama-batched-bench (decode per batch)."""
    tools = bin_dir()
    context = max(settings.batches) * (settings.prompt_tokens + settings.output_tokens)
    return {
        "llama_bench": llama_bench_command(
            gguf, threads, 2, ",".join(map(str, settings.prefill_lengths)), settings.output_tokens
        ),
        "batched_bench": [
            str(tools / "llama-batched-bench"), "-m", str(gguf), "-t", str(threads), "-tb", str(threads),
            "-c", str(context), "-b", "2048", "-ub", "512", "-npp", str(settings.prompt_tokens),
            "-ntg", str(settings.output_tokens), "-npl", ",".join(map(str, settings.batches)),
            "--output-format", "jsonl",
        ],
    }  # fmt: skip


def llama_bench_command(gguf: Path, threads: int, repetitions: int, prompts: str, tokens: int) -> list[str]:
    """``llama-bench`` with JSON output: prefill at each of ``prompts`` ("0": none), then tg``tokens`` from an
    empty context, ``repetitions`` times each."""
    return [str(bin_dir() / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-r", str(repetitions), "-o",
            "json", "-p", prompts, "-n", str(tokens)]  # fmt: skip


def tg_command(gguf: Path, threads: int, tokens: int, repetitions: int) -> list[str]:
    """``llama-bench`` timing only token generation (tg``tokens``), ``repetitions`` times."""
    return llama_bench_command(gguf, threads, repetitions, "0", tokens)


def _records(text: str) -> list[dict[str, Any]]:
    """The records of llama-bench's JSON output (it may print other lines around them)."""
    start = text.find("[")
    return json.loads(text[start : text.rindex("]") + 1]) if start >= 0 else []


def parse_tg_samples(text: str) -> list[float]:
    """Each repetition's tokens/s of llama-bench's tg test, from its JSON."""
    return [
        round(ts, 3)
        for record in _records(text)
        if record.get("n_gen")
        for ts in record.get("samples_ts", [])
    ]


def parse_llama_bench(text: str) -> dict[str, float]:
    """``prefill{N}_tok_s`` and ``tg{N}_tok_s`` from llama-bench's JSON."""
    out: dict[str, float] = {}
    for record in _records(text):
        if record.get("n_gen"):
            out[f"tg{record['n_gen']}_tok_s"] = round(record["avg_ts"], 3)
        elif record.get("n_prompt"):
            out[f"prefill{record['n_prompt']}_tok_s"] = round(record["avg_ts"], 2)
    return out


def parse_batched_bench(text: str) -> dict[str, float]:
    """``decode_b{N}_tok_s`` (aggregate output tokens/s over N sequences) from llama-batched-bench's JSONL."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            record = json.loads(line)
            out[f"decode_b{record['pl']}_tok_s"] = round(record["speed_tg"], 3)
    return out
