"""No network in the tests: a connection to anything but this machine raises :class:`NetworkBlocked`.

``conftest`` blocks the test process; a test's subprocess blocks itself by running through :data:`RUN_CLI`:

    subprocess.run([sys.executable, "-c", RUN_CLI, "fit", "--config", "configs/tiny.yaml"])
"""

from __future__ import annotations

import ipaddress
import socket

# `python -m meowdread.cli ...`, with the network blocked first.
RUN_CLI = (
    "from tests.offline import block_network; block_network(); "
    "import runpy; runpy.run_module('meowdread.cli', run_name='__main__', alter_sys=True)"
)

attempts: list[str] = []  # every blocked attempt, so a test fails even when a library swallows the error


class NetworkBlocked(RuntimeError):
    """Not an OSError on purpose: libraries treat those as "offline" and carry on quietly."""


def _is_local(host: object) -> bool:
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False  # a host name: resolving it is already network traffic


def _guard(address: object, what: str) -> None:
    if isinstance(address, (str, bytes)):  # an AF_UNIX socket path
        return
    host = address[0] if isinstance(address, tuple) and address else address
    if not _is_local(host):
        attempts.append(f"{what} {address!r}")
        raise NetworkBlocked(f"the tests run offline: {what} {address!r} refused")


def block_network() -> None:
    """Patch the socket module (idempotent)."""
    if getattr(socket, "_meowdread_blocked", False):
        return
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex
    create_connection, getaddrinfo = socket.create_connection, socket.getaddrinfo

    def guarded_connect(self, address):
        _guard(address, "connect to")
        return connect(self, address)

    def guarded_connect_ex(self, address):
        _guard(address, "connect to")
        return connect_ex(self, address)

    def guarded_create_connection(address, *args, **kwargs):
        _guard(address, "connect to")
        return create_connection(address, *args, **kwargs)

    def guarded_getaddrinfo(host, *args, **kwargs):
        _guard((host,), "look up")
        return getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex = guarded_connect, guarded_connect_ex
    socket.create_connection, socket.getaddrinfo = guarded_create_connection, guarded_getaddrinfo
    socket._meowdread_blocked = True
