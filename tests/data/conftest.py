"""A 127.0.0.1 HTTP server for the download tests (nothing in the tests touches the network)."""

from __future__ import annotations

import http.server
import threading

import pytest


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files``; honours Range unless told not to; can drop the connection part-way."""

    def do_GET(self):
        srv = self.server
        data = srv.files.get(self.path.lstrip("/"))
        srv.requests.append((self.path, self.headers.get("Range")))
        if data is None:
            self.send_error(404)
            return
        start, rng = 0, self.headers.get("Range")
        if rng and srv.honour_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut_after is not None:
            self.wfile.write(body[: srv.cut_after])
            self.wfile.flush()
            self.close_connection = True
            srv.cut_after = None
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.requests, srv.honour_range, srv.cut_after = {}, [], True, None
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()
