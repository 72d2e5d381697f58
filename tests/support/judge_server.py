"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1 for judge-client fault tests.

Behaviour per request comes from ``script`` (consumed in order, then ``default``): ``"judge"`` answers YES when
the prediction in the reference prompt equals the ground truth (case-insensitive) else NO; ``"score"`` (evaluation
judge: ``{"score": 1}`` -- 5 for a report -- when the fenced candidate contains the reference, else 0); ``"badjson"`` (a
reply that is not the JSON object); ``"500"``, ``"429"``; ``"garbage"`` (200 with a non-JSON body); ``"maybe"`` (a
valid completion saying "Maybe"); ``"hang"`` (sleeps ``hang_s``); ``"echo"`` (a stand-in model: repeats the
user's text); a callable (the reply is what it returns for the request body). With ``reject_response_format`` a
request carrying ``response_format`` gets a 400 (a server without structured outputs), consuming no script entry.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JudgeServer:
    def __init__(self, default="judge", script: list | None = None, hang_s: float = 5.0,
                 reject_response_format: bool = False):
        self.default, self.script, self.hang_s = default, list(script or []), hang_s
        self.reject_response_format = reject_response_format
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    if server.reject_response_format and "response_format" in body:
                        return self._send(400, b'{"error": {"message": "response_format is not supported"}}')
                    mode = server.script.pop(0) if server.script else server.default
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._respond(body, mode)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _respond(self, body, mode):
                if mode == "hang":
                    time.sleep(server.hang_s)
                    mode = "judge"
                if mode in ("500", "429"):
                    return self._send(int(mode), b'{"error": {"message": "scripted failure"}}')
                if mode == "garbage":
                    return self._send(200, b"<html>not json")
                prompt = body["messages"][-1]["content"]
                if callable(mode):
                    reply = mode(body)
                elif mode == "echo":  # a "model" that repeats the user's text (content parts joined)
                    parts = prompt if isinstance(prompt, list) else [{"type": "text", "text": prompt}]
                    reply = " ".join(p["text"] for p in parts if p["type"] == "text")
                elif mode == "maybe":
                    reply = "Maybe"
                elif mode == "badjson":
                    reply = "Score: 1"
                elif mode == "score":  # evaluation judge: JSON, judged on the first turn of the conversation
                    first = body["messages"][0]["content"]
                    candidate = re.search(r'"""(.*?)"""', first, re.DOTALL).group(1)
                    reference = re.search(r"Reference (?:answer|report):\n(.*?)\n\n", first, re.DOTALL).group(1)
                    top = 5 if "Reference report" in first else 1
                    reply = json.dumps({"score": top if reference.strip().lower() in candidate.lower() else 0})
                else:
                    # The reference prompt: "...\n\nPredicted:{predict}\nGround Truth:{ground_truth}\n"
                    predicted, truth = prompt.split("\nPredicted:", 1)[1].rsplit("\nGround Truth:", 1)
                    reply = "YES" if predicted.strip().lower() == truth.strip().lower() else "NO"
                self._send(200, json.dumps({
                    "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": reply}}],
                }).encode())

            def _send(self, status, payload):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128  # the pool's concurrent requests (socketserver's default backlog is 5)

            def handle_error(self, request, client_address):
                pass  # a client that gave up on a hanging reply closes the socket: expected here

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
