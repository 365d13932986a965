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


def test_a_pool_request_crosses_ray_as_its_bytes_whatever_its_payload():
    import ray.cloudpickle as cloudpickle

    from gptoss_vllm.serve.pool.deployment import PoolRequest

    deep: dict = {}
    for _ in range(5000):  # far past what pickling a parsed object survives
        deep = {"a": deep}
    body = b'{"messages": []}'
    request = PoolRequest("POST", "/v1/chat/completions", body, payload={"messages": [], "x": deep})
    arrived = cloudpickle.loads(cloudpickle.dumps(request))
    assert arrived.body == body and arrived.payload == {} and arrived.path == request.path
    assert request.payload["x"] is deep  # the router, in the ingress, still reads it
