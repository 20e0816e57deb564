"""Tests for nodeseal_client against a fake agent.

Run: python3 -m unittest discover -s client/python
"""

import json
import os
import shutil
import socket
import tempfile
import threading
import time
import unittest
from typing import Any, Callable, Dict, List, Optional

import nodeseal_client as nc

Handler = Callable[[Dict[str, Any]], Optional[bytes]]


def reply(obj: Dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def ok(req: Dict[str, Any], **fields: Any) -> bytes:
    resp = {"v": 1, "id": req.get("id"), "ok": True}
    resp.update(fields)
    return reply(resp)


def err(req: Dict[str, Any], code: str, message: str, retryable: bool = False) -> bytes:
    return reply(
        {
            "v": 1,
            "id": req.get("id"),
            "ok": False,
            "error": {"code": code, "message": message, "retryable": retryable},
        }
    )


def standard(req: Dict[str, Any]) -> Optional[bytes]:
    op = req.get("op")
    if op == "get":
        name = req["name"]
        if name == "PW":
            return ok(req, value="hunter2")
        if name == "A":
            return ok(req, value="1")
        return err(req, "not_found", "no value named %s" % name)
    if op == "env":
        return ok(
            req,
            values=[{"name": "A", "value": "1"}, {"name": "PW", "value": "hunter2"}],
        )
    if op == "list":
        return ok(req, names=["A", "PW"])
    if op == "open":
        return ok(req, value="opened:%s:%s" % (req.get("name"), req["token"]))
    if op == "health":
        return ok(req, info={"status": "ok", "version": "0.1.0", "keys": 1, "tasks": 0})
    if op == "status":
        return ok(req, info={"version": "0.1.0", "uptime_secs": 3, "keys": [], "tasks": []})
    if op in ("revoke", "restore"):
        state = "revoked" if op == "revoke" else "loaded"
        return ok(req, info={"thumbprint": req["thumbprint"], "state": state})
    return err(req, "bad_request", "unknown op")


class FakeAgent:
    """A thread serving a Unix socket; ``handler`` maps each request to response bytes, or None
    to hang up."""

    def __init__(self, handler: Handler, path: Optional[str] = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="nsfake")
        self.path = path or os.path.join(self.dir, "agent.sock")
        self.handler = handler
        self.requests: List[Dict[str, Any]] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(16)
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self.stopped:
                conn.close()
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                req = json.loads(line)
                self.requests.append(req)
                out = self.handler(req)
                if out is None:
                    return
                conn.sendall(out)
                if b'"code": "busy"' in out or b'"code":"busy"' in out:
                    return  # like the real agent, hang up after a busy answer

    def close(self) -> None:
        self.stopped = True
        self.listener.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class AgentTest(unittest.TestCase):
    def agent(self, handler: Handler = standard) -> FakeAgent:
        a = FakeAgent(handler)
        self.addCleanup(a.close)
        return a

    def client(self, agent: FakeAgent, **kw: Any) -> nc.Client:
        kw.setdefault("environ", {})
        c = nc.Client(socket_path=agent.path, **kw)
        self.addCleanup(c.close)
        return c


class DiscoveryTest(unittest.TestCase):
    def test_socket_order(self) -> None:
        with tempfile.TemporaryDirectory() as task_dir:
            env = {"AZ_BATCH_TASK_DIR": task_dir}
            self.assertEqual(nc.discover_socket({}), nc.DEFAULT_SOCKET_PATH)
            # No per-task socket yet: the host socket.
            self.assertEqual(nc.discover_socket(env), nc.DEFAULT_SOCKET_PATH)
            task_sock = os.path.join(task_dir, "nodeseal.sock")
            open(task_sock, "w").close()
            self.assertEqual(nc.discover_socket(env), task_sock)
            env["NODESEAL_SOCKET"] = "/env.sock"
            self.assertEqual(nc.discover_socket(env), "/env.sock")
            c = nc.Client(socket_path="/explicit.sock", environ=env)
            self.assertEqual(c.socket_path, "/explicit.sock")
            self.assertEqual(nc.Client(environ=env).socket_path, "/env.sock")

    def test_task(self) -> None:
        self.assertEqual(nc.discover_task({"AZ_BATCH_TASK_DIR": "/t/1"}), "/t/1")
        self.assertEqual(nc.discover_task({"AZ_BATCH_TASK_WORKING_DIR": "/t/2/wd"}), "/t/2")
        self.assertEqual(nc.discover_task({"AZ_BATCH_TASK_WORKING_DIR": "/t/2/wd/"}), "/t/2")
        self.assertIsNone(nc.discover_task({"AZ_BATCH_TASK_WORKING_DIR": "/t/2/work"}))
        self.assertIsNone(nc.discover_task({}))
        c = nc.Client(task="/mine", environ={"AZ_BATCH_TASK_DIR": "/t/1"})
        self.assertEqual(c.task, "/mine")

    def test_retry_budget(self) -> None:
        self.assertEqual(nc.Client(environ={}).retry_secs, 10.0)
        self.assertEqual(nc.Client(environ={"NODESEAL_RETRY_SECS": "2.5"}).retry_secs, 2.5)
        for bad in ("soon", "-1", "nan"):
            with self.assertRaises(nc.ConfigError):
                nc.Client(environ={"NODESEAL_RETRY_SECS": bad})


class OperationsTest(AgentTest):
    def test_every_op(self) -> None:
        a = self.agent()
        c = self.client(a, task="/tasks/t1")
        self.assertEqual(c.get("PW").reveal(), "hunter2")
        self.assertEqual([(n, v.reveal()) for n, v in c.env()], [("A", "1"), ("PW", "hunter2")])
        self.assertEqual(c.list(), ["A", "PW"])
        self.assertEqual(c.open("nodeseal.v1.x", "TOK").reveal(), "opened:TOK:nodeseal.v1.x")
        self.assertEqual(c.health()["status"], "ok")
        self.assertEqual(c.status()["uptime_secs"], 3)
        self.assertEqual(c.revoke("AB", purge=True)["state"], "revoked")
        self.assertEqual(c.restore("ab")["state"], "loaded")
        stripped = []
        for i, r in enumerate(a.requests, start=1):
            self.assertEqual(r.pop("v"), 1)
            self.assertEqual(r.pop("id"), i)
            stripped.append(r)
        self.assertEqual(
            stripped,
            [
                {"op": "get", "name": "PW", "task": "/tasks/t1"},
                {"op": "env", "task": "/tasks/t1"},
                {"op": "list", "task": "/tasks/t1"},
                {"op": "open", "task": "/tasks/t1", "token": "nodeseal.v1.x", "name": "TOK"},
                {"op": "health"},
                {"op": "status"},
                {"op": "revoke", "thumbprint": "AB", "purge": True},
                {"op": "restore", "thumbprint": "ab"},
            ],
        )

    def test_task_omitted_when_unknown(self) -> None:
        a = self.agent()
        self.client(a).list()
        self.assertNotIn("task", a.requests[0])

    def test_closed_connection_is_reopened(self) -> None:
        a = self.agent()
        c = self.client(a)
        self.assertEqual(c.get("A").reveal(), "1")
        # Simulate the agent closing the idle connection.
        assert c._sock is not None
        c._sock.shutdown(socket.SHUT_RDWR)
        self.assertEqual(c.get("PW").reveal(), "hunter2")


class PartialEnvTest(AgentTest):
    def test_one_bad_value_does_not_hide_the_others(self) -> None:
        def handler(req: Dict[str, Any]) -> bytes:
            return ok(
                req,
                values=[{"name": "A", "value": "1"}, {"name": "C", "value": "3"}],
                errors=[
                    {
                        "name": "B",
                        "error": {"code": "bad_token", "message": "not UTF-8", "retryable": False},
                    },
                    {
                        "name": "D",
                        "error": {"code": "key_unavailable", "message": "gone", "retryable": True},
                    },
                ],
            )

        c = self.client(self.agent(handler), retry_secs=0)
        values, failed = c.env_partial()
        self.assertEqual([(n, v.reveal()) for n, v in values], [("A", "1"), ("C", "3")])
        self.assertEqual([(e.name, type(e)) for e in failed], [("B", nc.BadToken), ("D", nc.KeyUnavailable)])  # type: ignore[attr-defined]
        # The all-or-nothing form raises the first failure and names every failed value.
        with self.assertRaises(nc.BadToken) as cm:
            c.env()
        self.assertIn("B: not UTF-8", str(cm.exception))
        self.assertIn("D (key_unavailable)", str(cm.exception))


class ErrorTest(AgentTest):
    CODES = {
        "not_found": (nc.NotFound, False),
        "forbidden": (nc.Forbidden, False),
        "key_unavailable": (nc.KeyUnavailable, True),
        "bad_token": (nc.BadToken, False),
        "expired": (nc.Expired, False),
        "bad_request": (nc.BadRequest, False),
        "too_large": (nc.TooLarge, False),
        "busy": (nc.Busy, True),
        "internal": (nc.Internal, False),
        "config_error": (nc.NodeMisconfigured, False),
    }

    def test_each_code_maps_to_its_class(self) -> None:
        a = self.agent(lambda req: err(req, req["name"], "message for " + req["name"]))
        c = self.client(a, retry_secs=0)
        for code, (cls, retryable) in self.CODES.items():
            with self.assertRaises(cls) as cm:
                c.get(code)
            self.assertEqual(cm.exception.code, code)
            self.assertEqual(cm.exception.retryable, retryable)
            self.assertIsInstance(cm.exception, nc.AgentError)
            self.assertIn("message for " + code, str(cm.exception))
        # An unknown (newer) code still raises an AgentError with the agent's retryable flag.
        a2 = self.agent(lambda req: err(req, "quota", "over quota", True))
        with self.assertRaises(nc.AgentError) as cm:
            self.client(a2, retry_secs=0).get("X")
        self.assertEqual(cm.exception.code, "quota")
        self.assertTrue(cm.exception.retryable)

    def test_busy_is_retried(self) -> None:
        left = [3]

        def handler(req: Dict[str, Any]) -> bytes:
            if req["name"] == "GONE":
                return err(req, "key_unavailable", "revoked", True)
            if left[0] > 0:
                left[0] -= 1
                return err(req, "busy", "rate limit", True)
            return ok(req, value="v")

        a = self.agent(handler)
        c = self.client(a, retry_secs=30)
        self.assertEqual(c.get("X").reveal(), "v")
        self.assertEqual(len(a.requests), 4)
        with self.assertRaises(nc.KeyUnavailable):
            c.get("GONE")
        self.assertEqual(len(a.requests), 5, "key_unavailable is left to the caller")

    def test_busy_retries_are_bounded(self) -> None:
        a = self.agent(lambda req: err(req, "busy", "full", True))
        with self.assertRaises(nc.Busy):
            self.client(a, retry_secs=0.3).get("X")
        self.assertGreater(len(a.requests), 1)
        b = self.agent(lambda req: err(req, "busy", "full", True))
        with self.assertRaises(nc.Busy):
            self.client(b, retry_secs=0).get("X")
        self.assertEqual(len(b.requests), 1)

    def test_unreachable(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "absent.sock")
            with self.assertRaises(nc.Unreachable) as cm:
                nc.Client(socket_path=path, retry_secs=0.2, environ={}).health()
            self.assertIn("absent.sock", str(cm.exception))
            self.assertTrue(cm.exception.retryable)

    def test_refused_socket_is_retried_until_the_agent_returns(self) -> None:
        d = tempfile.mkdtemp(prefix="nsref")
        self.addCleanup(shutil.rmtree, d, True)
        path = os.path.join(d, "agent.sock")
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(path)
        dead.close()  # the file stays: connecting is refused

        def restart() -> None:
            time.sleep(0.3)
            os.unlink(path)
            self.addCleanup(FakeAgent(standard, path=path).close)

        t = threading.Thread(target=restart)
        t.start()
        try:
            c = nc.Client(socket_path=path, retry_secs=30, environ={})
            self.assertEqual(c.get("A").reveal(), "1")
            c.close()
        finally:
            t.join()

    def test_hang_up_on_a_fresh_connection(self) -> None:
        a = self.agent(lambda req: None)
        with self.assertRaises(nc.ConnectionLost):
            self.client(a).get("A")
        self.assertEqual(len(a.requests), 1)


class NoLeakTest(AgentTest):
    def test_secret_is_redacted(self) -> None:
        a = self.agent()
        v = self.client(a).get("PW")
        self.assertNotIn("hunter2", repr(v))
        self.assertNotIn("hunter2", str(v))
        self.assertNotIn("hunter2", "%s %r" % (v, [v]))
        self.assertEqual(v.get_secret_value(), "hunter2")

    def test_malformed_responses_do_not_echo_values(self) -> None:
        def handler(req: Dict[str, Any]) -> bytes:
            name = req["name"]
            if name == "garbage":
                return b"hunter2 is not json\n"
            if name == "wrongtype":
                return reply({"v": 1, "ok": True, "value": ["hunter2"]})
            if name == "badutf8":
                return b'{"v":1,"ok":true,"value":"hunter2\xff"}\n'
            if name == "big":
                return reply({"v": 1, "ok": True, "value": "hunter2" * 500})
            return ok(req, value="fine")

        a = self.agent(handler)
        c = self.client(a, max_response_bytes=1000)
        for name in ("garbage", "wrongtype", "badutf8", "big"):
            with self.assertRaises(nc.ProtocolError) as cm:
                c.get(name)
            self.assertNotIn("hunter2", str(cm.exception), name)
            self.assertNotIn("hunter2", repr(cm.exception), name)
            self.assertIsNone(cm.exception.__cause__)
            self.assertTrue(cm.exception.__suppress_context__ or cm.exception.__context__ is None)
        self.assertEqual(c.get("ok").reveal(), "fine")


if __name__ == "__main__":
    unittest.main()
