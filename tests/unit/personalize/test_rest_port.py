"""The bounded run's progress finds the embedded Flink's REST endpoint anywhere in the port
range it gave Flink (the first port may have been taken before the JVM bound it)."""

from __future__ import annotations

import http.server
import threading

from personalize.flink import REST_PORT_SPAN, find_rest_port, free_port


def test_the_rest_port_is_found_where_flink_bound_it_in_the_range():
    class Jobs(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            found = self.path == "/jobs/abc"
            self.send_response(200 if found else 404)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    first = free_port()
    while first + REST_PORT_SPAN > 65535:
        first = free_port()
    server = None
    for port in range(first + 3, first + REST_PORT_SPAN):  # the first ports taken by someone else
        try:
            server = http.server.HTTPServer(("127.0.0.1", port), Jobs)
            break
        except OSError:
            continue
    assert server is not None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert find_rest_port(first, "abc") == server.server_address[1]
        assert find_rest_port(first, "other-job") is None  # another Flink's endpoint is not ours
    finally:
        server.shutdown()


def test_a_port_that_reads_back_its_own_request_is_not_known_and_no_job_failure():
    """A connection to a port nobody listens on can connect to itself (TCP's simultaneous
    open) and read back its own request line as the reply: http.client's BadStatusLine. The
    progress poll then knows nothing (None), as for any other port without Flink; it once
    ended a bounded run as "the Flink job failed: GET /jobs/... HTTP/1.1"."""
    import socket

    from personalize.flink import records_read

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]

    def echo() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            conn.sendall(conn.recv(65536))  # the request line comes back as the status line
            conn.close()

    threading.Thread(target=echo, daemon=True).start()
    try:
        assert records_read(port, "abc") is None
        assert find_rest_port(port, "abc") != port
    finally:
        listener.close()
