"""A long stream read in the background, for tests that change the cluster under it (a redeploy, a scale-down,
a node's loss) and then check what the client saw: events still arriving after the change, or the error event."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx


class LongStream:
    """``POST path`` with ``body`` streamed; every SSE ``data:`` line kept with its arrival time."""

    def __init__(self, url: str, path: str, body: dict[str, Any], api_key: str | None = None) -> None:
        self.events: list[tuple[float, str]] = []
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._thread = threading.Thread(
            target=self._read, args=(f"{url}{path}", {**body, "stream": True}, headers), daemon=True
        )
        self._thread.start()

    def _read(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        try:
            with httpx.stream("POST", url, json=body, headers=headers, timeout=300) as answer:
                self.headers = dict(answer.headers)
                self.status = answer.status_code
                for line in answer.iter_lines():
                    if line.startswith("data: "):
                        self.events.append((time.monotonic(), line[len("data: ") :]))
                    if self._stop.is_set():
                        return  # leaving the block closes the connection: the client hangs up
        except BaseException as exc:  # kept for the test to see
            self.failure = exc

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait_for_events(self, count: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.events) < count:
            assert not self.done, (
                f"the stream ended after {len(self.events)} events: {self.last()} {self.failure}"
            )
            assert time.monotonic() < deadline, f"only {len(self.events)} events after {timeout_s} s"
            time.sleep(0.1)

    def events_since(self, moment: float) -> int:
        return sum(1 for at, _ in self.events if at > moment)

    def errors(self) -> list[dict[str, Any]]:
        found = []
        for _, data in self.events:
            if data.startswith("{") and '"error"' in data:
                event = json.loads(data)
                if "error" in event:
                    found.append(event["error"])
        return found

    def last(self) -> str | None:
        return self.events[-1][1] if self.events else None

    def assert_flowing(self, after: float, seconds: float = 3.0) -> None:
        """Events arrived after ``after`` and keep arriving for ``seconds`` more, with no error and no end."""
        deadline = time.monotonic() + seconds
        start = self.events_since(after)
        while time.monotonic() < deadline:
            assert not self.done, f"the stream ended: {self.last()} {self.failure}"
            time.sleep(0.2)
        assert self.events_since(after) > start, "no event arrived"
        assert not self.errors(), self.errors()

    def close(self, timeout_s: float = 30) -> None:
        """Hang up."""
        self._stop.set()
        self._thread.join(timeout_s)
