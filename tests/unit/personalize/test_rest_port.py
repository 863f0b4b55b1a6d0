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
