"""preStop hook of every Ray pod: wait until this pod's replicas have no request in flight, so that a rollout
(or a scale-down) does not cut a stream. Reads the pod's own metrics endpoints (GPTOSS_METRICS_PORT and the
ports above it): vLLM's running/waiting requests and the ingress's in-flight requests. Returns once they are
all zero twice in a row, or no endpoint answers; the pod's terminationGracePeriodSeconds bounds the wait."""

import os
import re
import time
import urllib.request

FIRST = int(os.environ.get("GPTOSS_METRICS_PORT", "9500"))
COUNT = int(os.environ.get("GPTOSS_METRICS_PORT_COUNT", "16"))
BUSY = re.compile(
    r"^(vllm:num_requests_running|vllm:num_requests_waiting|gptoss_in_flight_requests)(\{[^}]*\})? (\S+)$"
)


def in_flight():
    total, answered = 0.0, 0
    for port in range(FIRST, FIRST + COUNT):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                text = response.read().decode()
        except OSError:
            continue
        answered += 1
        for line in text.splitlines():
            match = BUSY.match(line)
            if match:
                total += float(match.group(3))
    return total, answered


def main():
    time.sleep(5)  # let the proxies and the router stop sending new requests here
    idle = 0
    while idle < 2:
        total, answered = in_flight()
        if answered == 0:
            return
        idle = idle + 1 if total == 0 else 0
        print(f"drain: {total:.0f} request(s) in flight on {answered} endpoint(s)", flush=True)
        time.sleep(5)


main()
