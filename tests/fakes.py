"""Test doubles shared by several test folders."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal


class RecordingQueue:
    """An app.queue.Queue that records the job ids sent; `fail` makes sends raise. `depth` is the
    depth it reports: a number, None (the broker cannot be asked) or "sent" (the ids recorded)."""

    def __init__(self, depth: int | None | Literal["sent"] = "sent") -> None:
        self.sent: list[str] = []
        self.depth = depth
        self.fail: Exception | None = None

    def enqueue_training(self, job_id: str) -> None:
        if self.fail is not None:
            raise self.fail
        self.sent.append(job_id)

    def queue_depth(self) -> int | None:
        return len(self.sent) if self.depth == "sent" else self.depth

    def ready(self) -> bool:
        return True


class Receiver:
    """Records each POST (path, headers, raw body) and answers the next status of `answers`
    (the last one repeats); a 3xx carries `Location: /elsewhere`."""

    def __init__(self, *answers: int) -> None:
        self.answers = list(answers) or [200]
        self.requests: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status = receiver.answers[min(len(receiver.requests), len(receiver.answers)) - 1]
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
