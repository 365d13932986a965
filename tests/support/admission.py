"""Admission states made on purpose, for stack tests that need a pool to queue, spill or refuse.

A test that needs a pool full does not send a burst and hope that the requests overlap (whether they do depends
on how fast the machine answers). It holds slots with :class:`HeldRequest`, streams that stay in flight until
the test releases them, and waits on the in-flight counts the ingress exports (``gptoss_in_flight_requests``)
until the ingress has admitted every one of them. Only then does it send the request whose admission it checks.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from tests.support import http

Samples = dict[tuple[str, frozenset], float]

# A held request generates until it is released, so its output must outlast whatever the test does meanwhile
# on a slow, loaded machine (scrapes of a busy 2-core stack took up to 5 s here). Stacks that hold slots run
# their pools with this context, beyond the tiny presets' 4096 positions, and budgets that allow HOLD_TOKENS.
HOLD_MAX_MODEL_LEN = 32768
HOLD_TOKENS = 30000
HOLD_ENV = {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}
POLL_S = 0.25


def monitoring_headers(token: str | None = None) -> dict[str, str]:
    """What GET /metrics/targets requires: ``token``, or the monitoring token the stacks of this session
    were given."""
    return {"Authorization": f"Bearer {token or os.environ['GPTOSS_VLLM_MONITORING_TOKEN']}"}


def _exposition(address: str) -> Samples:
    text = http.get(f"http://{address}/metrics", timeout=60).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def target_samples(
    url: str, component: str, *, monitoring_token: str | None = None, **labels: str
) -> Samples:
    """The expositions of every announced target of ``component`` (and ``labels``), summed by sample."""
    headers = monitoring_headers(monitoring_token)
    targets = http.get(f"{url}/metrics/targets", headers=headers, timeout=30).json()
    summed: Samples = {}
    for target in targets:
        found = target["labels"]
        if found.get("component") != component or any(found.get(k) != v for k, v in labels.items()):
            continue
        for key, value in _exposition(target["targets"][0]).items():
            summed[key] = summed.get(key, 0.0) + value
    return summed


def engine_running(url: str, pool: str) -> float:
    """The requests the pool's engines run now (vLLM's ``vllm:num_requests_running``, from the replicas)."""
    samples = target_samples(url, "pool", pool=pool)
    return sum(value for (name, _), value in samples.items() if name == "vllm:num_requests_running")


def samples_by_replica(url: str, component: str) -> dict[str, Samples]:
    """Each announced target of ``component``'s exposition, by its replica label."""
    targets = http.get(f"{url}/metrics/targets", headers=monitoring_headers(), timeout=30).json()
    return {
        target["labels"]["replica"]: _exposition(target["targets"][0])
        for target in targets
        if target["labels"].get("component") == component
    }


@functools.cache
def _ingress_target(url: str) -> str:
    targets = http.get(f"{url}/metrics/targets", headers=monitoring_headers(), timeout=30).json()
    (ingress,) = [t for t in targets if t["labels"]["component"] == "ingress"]
    return ingress["targets"][0]


def ingress_samples(url: str) -> Samples:
    """The ingress's own exposition, as {(sample name, labels): value}, read from the target it announces
    (found once: polls read it often)."""
    return _exposition(_ingress_target(url))


def in_flight(url: str) -> dict[str, int]:
    """Requests the ingress has admitted to each pool and not finished."""
    return {
        dict(labels)["pool"]: int(value)
        for (name, labels), value in ingress_samples(url).items()
        if name == "gptoss_in_flight_requests"
    }


def wait_for_in_flight(url: str, expected: dict[str, int], timeout_s: float = 120) -> None:
    """Until the ingress counts exactly ``expected`` in flight for each pool named (a deadline, not a pace)."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = in_flight(url)
        if all(counts.get(pool) == n for pool, n in expected.items()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"in-flight requests {counts}, expected {expected} after {timeout_s} s")
        time.sleep(POLL_S)


class HeldRequest:
    """A streamed request that stays in flight until :meth:`release` (the client hangs up).

    It is sent over a raw socket and its answer is never read: only the ingress's admission of it matters.
    Give it a long output (``max_tokens`` near its budget, ``ignore_eos``), so that it outlasts the requests
    the test sends while it holds the slot; :func:`holding` checks that it did.
    """

    def __init__(
        self,
        url: str,
        path: str,
        body: dict,
        api_key: str | None = None,
        stream: bool = True,
        headers: dict[str, str] | None = None,
    ) -> None:
        address = urlsplit(url)
        payload = json.dumps({**body, "stream": stream}).encode()
        head = [
            f"POST {path} HTTP/1.1",
            f"Host: {address.netloc}",
            "Content-Type: application/json",
            f"Content-Length: {len(payload)}",
            *(f"{name}: {value}" for name, value in (headers or {}).items()),
        ]
        if api_key:
            head.append(f"Authorization: Bearer {api_key}")
        self._sock = socket.create_connection((address.hostname, address.port), timeout=30)
        self._sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


@contextlib.contextmanager
def holding(
    url: str, path: str, bodies: dict[str, list[dict]], api_key: str | None = None
) -> Iterator[list[HeldRequest]]:
    """Hold ``bodies[pool]`` in flight at each pool (sent one by one, each admitted before the next), yield,
    then check that they were all still in flight, release them and wait until the ingress let them go.

    The pools named must have nothing else in flight when this starts."""
    held: list[HeldRequest] = []
    counts = dict.fromkeys(bodies, 0)
    try:
        wait_for_in_flight(url, counts)
        for pool, pool_bodies in bodies.items():
            for body in pool_bodies:
                held.append(HeldRequest(url, path, body, api_key))
                counts[pool] += 1
                wait_for_in_flight(url, counts)
        yield held
        now = in_flight(url)
        assert all(now.get(pool, 0) >= n for pool, n in counts.items()), (
            f"a held request finished before the test released it (in flight {now}, held {counts}): "
            "give the held requests a longer output"
        )
    finally:
        for request in held:
            request.release()
    wait_for_in_flight(url, dict.fromkeys(bodies, 0))
