"""The Responses service without Ray: a real SQLite store and the ingress's real metrics. Its forward call is
the only stand-in (the pool forwarder needs Ray's handles): it answers as a pool would, or waits to be stopped.

Stored responses exist for their owner only (misses and hits counted), finished answers are kept unless the
client said ``store: false``, the routes' actions read, list, delete and cancel, and a store that cannot be
reached is answered 503 with Retry-After and counted, never ignored."""

from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client import CollectorRegistry
from starlette.responses import JSONResponse

from gptoss_vllm.observability.metrics import IngressMetrics
from gptoss_vllm.serve.config_load import parse_config
from gptoss_vllm.serve.ingress.pipeline import Decision
from gptoss_vllm.serve.ingress.refusal import Refusal
from gptoss_vllm.serve.ingress.responses.service import ResponsesService
from gptoss_vllm.serve.pool.deployment import PoolRequest
from tests.support.ingress_metrics import samples
from tests.support.serving_config import serving_config


def _service(tmp_path, forward=None) -> tuple[ResponsesService, CollectorRegistry]:
    config = parse_config(serving_config(response_store={"path": str(tmp_path / "responses.sqlite3")}))
    registry = CollectorRegistry()

    async def never(*_):  # no background response in this test reaches a pool
        raise AssertionError("forwarded")

    return ResponsesService(config, IngressMetrics(registry), forward or never), registry


def _decision(key: str = "tenant", **fields) -> Decision:
    settings = {"response_id": "resp_1", "store": True, "input_items": [{"role": "user", "content": "Hi"}]}
    return Decision(key_name=key, **{**settings, **fields})


def _counted(registry: CollectorRegistry, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, k), v in samples(registry).items() if n == name and wanted <= k)


def test_a_kept_response_exists_for_its_owner_only_and_every_action_works(tmp_path):
    async def scenario() -> None:
        service, registry = _service(tmp_path)
        document = json.dumps({"id": "resp_1", "object": "response", "status": "completed", "output": []})
        await service.keep(_decision(), document.encode())
        await service.keep(_decision(response_id="resp_2", store=False), document.encode())
        found = await service.owned("resp_1", _decision())
        assert found.response["status"] == "completed" and found.owner == "tenant"
        for key, response_id in (("someone-else", "resp_1"), ("tenant", "resp_2")):
            with pytest.raises(Refusal) as missing:
                await service.owned(response_id, _decision(key))
            assert (missing.value.status, missing.value.code) == (404, "response_not_found")
        assert _counted(registry, "gptoss_response_store_lookups_total", result="hit") == 1
        assert _counted(registry, "gptoss_response_store_lookups_total", result="miss") == 2
        listed = await service.act("input_items", "resp_1", _decision(), {"limit": "1"})
        assert json.loads(listed.body)["data"][0]["content"] == [{"type": "input_text", "text": "Hi"}]
        with pytest.raises(Refusal) as streamed:
            await service.act("get", "resp_1", _decision(), {"stream": "true"})
        assert (streamed.value.status, streamed.value.param) == (400, "stream")
        with pytest.raises(Refusal) as not_background:
            await service.act("cancel", "resp_1", _decision(), {})
        assert not_background.value.status == 400
        deleted = await service.act("delete", "resp_1", _decision(), {})
        assert json.loads(deleted.body) == {"id": "resp_1", "object": "response.deleted", "deleted": True}
        with pytest.raises(Refusal):
            await service.act("get", "resp_1", _decision(), {})
        await service.close()

    asyncio.run(scenario())


def test_a_background_response_runs_until_it_is_cancelled(tmp_path):
    async def scenario() -> None:
        started, stopped = asyncio.Event(), asyncio.Event()

        async def forward(decision, pool_request, record):  # a pool that answers slowly
            started.set()
            try:
                await asyncio.sleep(3600)
            finally:
                stopped.set()
            return JSONResponse({})

        service, _ = _service(tmp_path, forward)
        decision = _decision(background=True, body={"model": "m", "input": "Hi"}, pool="deep")
        decision.response_fields = {"store": True, "previous_response_id": None, "background": True}
        queued = await service.start_background(decision, PoolRequest("POST", "/v1/responses"))
        assert json.loads(queued.body)["status"] == "queued" and queued.headers["x-gptoss-pool"] == "deep"
        await asyncio.wait_for(started.wait(), 10)
        cancelled = await service.act("cancel", "resp_1", _decision(), {})
        assert json.loads(cancelled.body)["status"] == "cancelled"
        await asyncio.wait_for(stopped.wait(), 10)  # the run saw the cancel at its next lease renewal
        assert (await service.owned("resp_1", _decision())).response["status"] == "cancelled"
        await service.close()

    asyncio.run(scenario())


def test_a_store_that_fails_is_503_with_retry_after_and_counted(tmp_path):
    async def scenario() -> None:
        (tmp_path / "responses.sqlite3").mkdir()  # where the store's file goes, a directory: every call fails
        service, registry = _service(tmp_path)
        with pytest.raises(Refusal) as refused:
            await service.owned("resp_1", _decision())
        assert (refused.value.status, refused.value.code) == (503, "store_unavailable")
        assert int(refused.value.headers["Retry-After"]) >= 1
        assert _counted(registry, "gptoss_response_store_errors_total", operation="get") == 1
        await service.close()

    asyncio.run(scenario())
