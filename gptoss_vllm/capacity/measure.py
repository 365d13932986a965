"""``gptoss-vllm bench curves``: one engine's service curve, measured against a running OpenAI endpoint.

The same command runs against a vLLM server on a GPU and against the stack here. Every request is a streamed
``/v1/completions`` call whose prompt is token ids (exact lengths, no tokenizer needed) with ``ignore_eos``
(vLLM's extension) so that every output has the asked length. Through the stack, ``--effort`` picks the pool
(the ``X-Reasoning-Effort`` header); a pool of one replica measures one engine.

- **Decode:** at each concurrency ``c``, ``c`` requests at once (short prompts); time per output token is the
  median over them of (last token - first token) / (tokens - 1).
- **Prefill:** one request alone at each prompt length, one output token; its time to first token (the best of
  two).
- **A pool of several replicas** (``replicas`` > 1): each figure is taken with every replica loaded alike,
  ``c x replicas`` streams at a concurrency ``c`` and ``replicas`` prefills at once, and recorded per replica.
  Where replicas share a machine (CPU cores, memory bandwidth, the serving processes) that is the curve a
  replica has under load, which one replica alone does not show.
- **Capacity:** ``max_num_seqs`` as given, else the highest concurrency measured (the curve holds up to there);
  the KV cache's tokens as given, else from vLLM's ``vllm:cache_config_info`` (blocks x block size) on
  ``/metrics``.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import statistics
import time
from typing import Any

import httpx

from gptoss_vllm.capacity import CapacityError
from gptoss_vllm.capacity.curve import Curve


class MeasureError(CapacityError, RuntimeError):
    """The endpoint did not answer as a curve needs; the message says what it did."""


async def _stream(client: httpx.AsyncClient, model: str, prompt: list[int], tokens: int, effort: str | None
                  ) -> tuple[float, float, int]:  # fmt: skip
    """One streamed completion: (seconds to the first token, seconds to the last, tokens received)."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "ignore_eos": True, "stream": True,
            "temperature": 0.0}  # fmt: skip
    headers = {"X-Reasoning-Effort": effort} if effort else {}
    start = time.perf_counter()
    first = last = None
    received = 0
    async with client.stream("POST", "/v1/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")[:300]
            raise MeasureError(f"POST /v1/completions answered {response.status_code}: {text}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if any(choice.get("text") is not None for choice in chunk.get("choices", [])):
                now = time.perf_counter()
                first = first if first is not None else now
                last = now
                received += 1
    if first is None:
        raise MeasureError("the stream carried no token")
    return first - start, last - start, received


def _prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(1000, 30000) for _ in range(length)]


def _kv_tokens(metrics: str) -> int | None:
    """Blocks x block size from vLLM's cache_config_info gauge, if the endpoint exposes it."""
    for line in metrics.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            blocks = labels.get("num_gpu_blocks") or labels.get("num_cpu_blocks")
            if blocks and blocks != "None" and labels.get("block_size"):
                return int(blocks) * int(labels["block_size"])
    return None


async def measure(
    url: str,
    model: str | None = None,
    concurrency: list[int] | None = None,
    prompt_lengths: list[int] | None = None,
    decode_prompt: int = 32,
    output_tokens: int = 32,
    effort: str | None = None,
    max_num_seqs: int | None = None,
    kv_capacity_tokens: int | None = None,
    replicas: int = 1,
    progress: bool = True,
) -> Curve:
    from tqdm import tqdm

    concurrency = sorted(concurrency or [1, 2, 4, 8])
    prompt_lengths = sorted(prompt_lengths or [64, 256, 1024])
    rng = random.Random(0)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=httpx.Timeout(600.0)) as client:
        try:
            models = (await client.get("/v1/models")).json()["data"]
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            raise MeasureError(f"{url}/v1/models did not list a model: {exc}") from None
        model = model or models[0]["id"]
        bar = tqdm(
            total=len(concurrency) + 2 * len(prompt_lengths) + 1, desc="bench curves", disable=not progress
        )
        await _stream(client, model, _prompt(rng, 8), 2, effort)  # first-call costs out of the figures
        bar.update()
        decode = []
        for c in concurrency:
            runs = await asyncio.gather(
                *(
                    _stream(client, model, _prompt(rng, decode_prompt), output_tokens, effort)
                    for _ in range(c * replicas)
                )
            )
            tpots = [(last - first) / (n - 1) for first, last, n in runs if n > 1]
            if not tpots:
                raise MeasureError("streams of one token: raise --output-tokens")
            decode.append((c, round(statistics.median(tpots), 5)))
            bar.update()
        prefill = []
        for length in prompt_lengths:
            ttfts = []
            for _ in range(2):
                runs = await asyncio.gather(
                    *(_stream(client, model, _prompt(rng, length), 1, effort) for _ in range(replicas))
                )
                ttfts.append(statistics.median(ttft for ttft, _last, _n in runs))
                bar.update()
            prefill.append((length, round(min(ttfts), 5)))
        bar.close()
        if kv_capacity_tokens is None:
            try:
                kv_capacity_tokens = _kv_tokens((await client.get("/metrics")).text)
            except httpx.HTTPError:
                kv_capacity_tokens = None
        if kv_capacity_tokens is None:
            raise MeasureError(
                f"{url}/metrics has no vllm:cache_config_info with the KV cache's blocks: give --kv-capacity-tokens"
            )
    return Curve(
        max_num_seqs=max_num_seqs or max(concurrency),
        kv_capacity_tokens=kv_capacity_tokens,
        decode=tuple(decode),
        prefill=tuple(prefill),
        model=model,
        source=f"bench curves against {url}"
        + (f" (effort {effort})" if effort else "")
        + (f", {replicas} replicas loaded alike" if replicas > 1 else ""),
    )


def run(url: str, json_path: str | None = None, **options: Any) -> dict[str, Any]:
    try:
        curve = asyncio.run(measure(url, **options))
    except httpx.HTTPError as exc:
        raise MeasureError(f"{url}: {type(exc).__name__}: {exc}") from None
    data = curve.to_json()
    if json_path:
        with open(json_path, "w") as out:
            json.dump(data, out, indent=2)
            out.write("\n")
    return data
