"""Every TCP port of each host that accepts a connection (stdlib only).

    python port_scan.py HOST [HOST ...]  ->  {"HOST": {"ADDRESS": [PORT, ...]}, ...}

The container tests run it inside a container on the federation's network (fed
on stdin: `python - HOST ...`). Ports 1-65535 of every address each host name
resolves to, a few thousand non-blocking connects at a time. A port counts as
accepting only when the connection completes; refused and unanswered ones do
not, so the verdict does not depend on how fast the machine is.
"""

from __future__ import annotations

import errno
import json
import selectors
import socket
import sys
import time

BATCH = 4000
WAIT = 10.0


def accepting(address: str, family: int) -> list[int]:
    found = []
    for start in range(1, 65536, BATCH):
        selector = selectors.DefaultSelector()
        for port in range(start, min(start + BATCH, 65536)):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            code = sock.connect_ex((address, port))
            if code == 0:
                found.append(port)
                sock.close()
            elif code in (errno.EINPROGRESS, errno.EAGAIN):
                selector.register(sock, selectors.EVENT_WRITE, port)
            else:
                sock.close()
        deadline = time.monotonic() + WAIT
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.5):
                sock = key.fileobj
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    found.append(key.data)
                selector.unregister(sock)
                sock.close()
        for key in list(selector.get_map().values()):
            selector.unregister(key.fileobj)
            key.fileobj.close()
        selector.close()
    return sorted(found)


def main(hosts: list[str]) -> dict:
    result = {}
    for host in hosts:
        addresses = {
            (info[0], info[4][0])
            for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        }
        result[host] = {address: accepting(address, family) for family, address in addresses}
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
