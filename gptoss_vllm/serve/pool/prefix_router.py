"""The prefix-aware pool router: Ray Serve LLM's prefix-cache affinity, counting its replicas for the ingress.

Its own module because Ray Serve LLM's package imports vLLM and torch: a process loads it only when it routes
a pool whose ``router`` is ``prefix_aware`` (Ray Serve imports the class by path, in the calling process).
Ray Serve LLM's router module needs pyarrow (the ``[serve]`` extra installs it).
"""

from __future__ import annotations

from ray.serve.llm.request_router import PrefixCacheAffinityRouter

from gptoss_vllm.serve.pool.router import Counting


class CountingPrefixAwareRouter(Counting, PrefixCacheAffinityRouter):
    """Prefix-cache affinity (Ray Serve LLM's router)."""
