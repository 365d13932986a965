"""The pools' request routers: what the prefix-aware router sees of a request."""

from __future__ import annotations


def test_pool_requests_show_their_prompt_to_the_prefix_aware_router():
    from gptoss_vllm.serve.pool.deployment import PoolRequest

    # Ray Serve LLM's prefix-aware router reads the prompt from these attributes.
    chat = PoolRequest(
        "POST", "/v1/chat/completions", payload={"messages": [{"role": "user", "content": "x"}]}
    )
    assert chat.messages == [{"role": "user", "content": "x"}]
    assert PoolRequest("POST", "/v1/completions", payload={"prompt": "p"}).prompt == "p"
