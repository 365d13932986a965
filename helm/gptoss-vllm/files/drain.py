"""preStop hook of every Ray pod: wait until this pod's replicas have no request in flight, so that a rollout
(or a scale-down) does not cut a stream. Reads the pod's own metrics endpoints (GPTOSS_VLLM_METRICS_PORT and the
ports above it): vLLM's running/waiting requests and the ingress's in-flight requests (background responses
included). The endpoints listen on the node's address, which Ray uses, not on loopback: the hook asks at the
pod's IP (POD_IP, from the downward API) and at the address Ray finds for the node. Returns once they are all
zero twice in a row, or no endpoint answers; the pod's terminationGracePeriodSeconds bounds the wait."""

import os
import re
import socket
import time
import urllib.request

FIRST = int(os.environ.get("GPTOSS_VLLM_METRICS_PORT", "9500"))
COUNT = int(os.environ.get("GPTOSS_VLLM_METRICS_PORT_COUNT", "16"))
POLL_S = float(os.environ.get("GPTOSS_VLLM_DRAIN_POLL_S", "5"))
BUSY = re.compile(
    r"^(vllm:num_requests_running|vllm:num_requests_waiting|gptoss_in_flight_requests)(\{[^}]*\})? (\S+)$"
)


def node_address():
    """The address Ray picks for this node: the one the default route leaves from (no packet is sent)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("8.8.8.8", 80))
        return probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()


def addresses():
    found = [os.environ.get("POD_IP"), node_address(), "127.0.0.1"]
    return list(dict.fromkeys(address for address in found if address))


def in_flight(hosts):
    """Requests in flight on every endpoint that answers, and how many answered."""
    total, answered = 0.0, 0
    for port in range(FIRST, FIRST + COUNT):
        for host in hosts:
            try:
                with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2) as response:
                    text = response.read().decode()
            except OSError:
                continue
            answered += 1
            for line in text.splitlines():
                match = BUSY.match(line)
                if match:
                    total += float(match.group(3))
            break  # one address of this port answered: the others are the same endpoint or none
    return total, answered


def main():
    hosts = addresses()
    time.sleep(POLL_S)  # let the proxies and the router stop sending new requests here
    idle = 0
    while idle < 2:
        total, answered = in_flight(hosts)
        if answered == 0:
            print(
                f"drain: no metrics endpoint answers on {', '.join(hosts)} ports {FIRST}-{FIRST + COUNT - 1}"
            )
            return
        idle = idle + 1 if total == 0 else 0
        print(f"drain: {total:.0f} request(s) in flight on {answered} endpoint(s)", flush=True)
        time.sleep(POLL_S)


if __name__ == "__main__":
    main()
