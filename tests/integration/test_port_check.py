"""`up`'s check that a port is free, against real sockets on loopback: a connection left
in TIME_WAIT by a server that stopped (its /metrics was scraped) does not hold the port;
a listener does."""

from __future__ import annotations

import socket

import psutil

from promptbatch.up import port_free


def _time_wait_on(port: int) -> bool:
    return any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_TIME_WAIT
               for c in psutil.net_connections(kind="tcp4"))


def _serve_one_connection() -> int:
    """A server answers one connection and closes it first (as an HTTP server does after
    a response), then stops listening: its side is left in TIME_WAIT on its port."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = int(server.getsockname()[1])
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n# metrics\n")
    conn.close()  # the server closes first
    assert client.recv(100).startswith(b"HTTP/1.0 200")
    client.close()
    server.close()
    return port


def test_a_port_left_in_time_wait_is_free_and_a_listened_one_is_not() -> None:
    port = _serve_one_connection()
    assert _time_wait_on(port), "the test could not leave a connection in TIME_WAIT"
    assert port_free(port)  # nothing listens: a new server can bind it (SO_REUSEADDR)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))  # as the scheduler's /metrics server would
    listener.listen()
    try:
        assert not port_free(port)
    finally:
        listener.close()
