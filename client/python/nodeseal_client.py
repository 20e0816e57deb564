"""Client for the nodeseal agent (protocol version 1), standard library only.

A task process asks the node's ``nodeseal-agent`` for the cleartext of values sealed into its
task, over a Unix socket; the agent decides by the caller's kernel credentials (SO_PEERCRED).
See ``docs/protocol.md`` for the wire protocol.

Example::

    import nodeseal_client

    with nodeseal_client.Client() as client:
        password = client.get("DB_PASSWORD")
        connect_to_db(password.reveal())

Discovery: an explicit ``socket_path``, else ``$NODESEAL_SOCKET``, else
``$AZ_BATCH_TASK_DIR/nodeseal.sock`` if it exists, else ``/run/nodeseal/agent.sock``. The task
directory sent with each request is ``task``, else ``$AZ_BATCH_TASK_DIR``, else the parent of
``$AZ_BATCH_TASK_WORKING_DIR`` when that ends in ``/wd``. A missing or refusing socket and
``busy`` answers are retried with exponential backoff (50 ms doubling to 1 s) for 10 s in total,
or ``$NODESEAL_RETRY_SECS``.

Values come back as :class:`Secret`, whose ``repr``/``str`` are redacted. Python cannot wipe
strings from memory; keep values short-lived.
"""

import json
import os
import socket
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type

__all__ = [
    "Client",
    "Secret",
    "NodesealError",
    "AgentError",
    "NotFound",
    "Forbidden",
    "KeyUnavailable",
    "BadToken",
    "Expired",
    "BadRequest",
    "TooLarge",
    "Busy",
    "Internal",
    "Unreachable",
    "ConnectionLost",
    "ProtocolError",
    "ConfigError",
    "discover_socket",
    "discover_task",
    "PROTOCOL_VERSION",
    "DEFAULT_SOCKET_PATH",
]

__version__ = "0.1.0"

PROTOCOL_VERSION = 1
DEFAULT_SOCKET_PATH = "/run/nodeseal/agent.sock"
SOCKET_ENV = "NODESEAL_SOCKET"
RETRY_SECS_ENV = "NODESEAL_RETRY_SECS"
TASK_SOCKET_NAME = "nodeseal.sock"
DEFAULT_RETRY_SECS = 10.0
DEFAULT_TIMEOUT_SECS = 30.0
DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024
_BACKOFF_START = 0.05
_BACKOFF_MAX = 1.0
_CHUNK = 64 * 1024


class Secret:
    """A cleartext value: ``repr`` and ``str`` never show it; call :meth:`reveal`."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The cleartext."""
        return self._value

    # pydantic's spelling, so code written for SecretStr works unchanged.
    get_secret_value = reveal

    def __repr__(self) -> str:
        return "Secret('[REDACTED]')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Secret):
            return self._value == other._value
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._value)

    def __len__(self) -> int:
        return len(self._value)


class NodesealError(Exception):
    """Base class of every error this module raises. Messages never contain secrets."""

    #: Stable protocol error code, or None for client-side errors.
    code: Optional[str] = None
    #: Whether the same request may succeed later.
    retryable: bool = False


class AgentError(NodesealError):
    """The agent answered with an error response."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__("the nodeseal agent refused the request (%s): %s" % (code, message))
        self.code = code
        self.message = message


class NotFound(AgentError):
    """No such value (or task) in the caller's scope."""


class Forbidden(AgentError):
    """The caller's kernel credentials do not allow this."""


class KeyUnavailable(AgentError):
    """The key needed is missing or revoked right now; retry later."""

    retryable = True


class BadToken(AgentError):
    """The token is malformed, tampered with, or bound to another name."""


class Expired(AgentError):
    """The token's not-after time has passed."""


class BadRequest(AgentError):
    """The request line is not a valid request."""


class TooLarge(AgentError):
    """The request line or a value is over a limit."""


class Busy(AgentError):
    """The agent is at a limit (connections, rate); retry later."""

    retryable = True


class Internal(AgentError):
    """Something went wrong inside the agent."""


class NodeMisconfigured(AgentError):
    """The agent's configuration cannot serve this (``config_error``); an operator must fix the
    node, retrying will not help (``nodeseal-client`` exits 78)."""


#: Protocol error code -> exception class.
ERROR_CLASSES: Dict[str, Type[AgentError]] = {
    "not_found": NotFound,
    "forbidden": Forbidden,
    "key_unavailable": KeyUnavailable,
    "bad_token": BadToken,
    "expired": Expired,
    "bad_request": BadRequest,
    "too_large": TooLarge,
    "busy": Busy,
    "internal": Internal,
    "config_error": NodeMisconfigured,
}


class Unreachable(NodesealError):
    """No agent could be reached at the socket within the retry budget."""

    retryable = True

    def __init__(self, path: str, cause: OSError) -> None:
        super().__init__(
            "cannot reach the nodeseal agent at %s: %s; check that nodeseal-agent is running, "
            "or point NODESEAL_SOCKET at its socket" % (path, cause.strerror or cause)
        )
        self.path = path


class ConnectionLost(NodesealError):
    """The connection broke or timed out during a request."""

    retryable = True


class ProtocolError(NodesealError):
    """The agent's answer is not a valid protocol-v1 response."""


class ConfigError(NodesealError):
    """Bad client configuration, e.g. an unparsable ``NODESEAL_RETRY_SECS``."""


def discover_socket(
    environ: Optional[Mapping[str, str]] = None, exists: Any = os.path.exists
) -> str:
    """``$NODESEAL_SOCKET``, else ``$AZ_BATCH_TASK_DIR/nodeseal.sock`` if it exists, else the
    host socket."""
    env = os.environ if environ is None else environ
    explicit = env.get(SOCKET_ENV)
    if explicit:
        return explicit
    task_dir = env.get("AZ_BATCH_TASK_DIR")
    if task_dir:
        candidate = os.path.join(task_dir, TASK_SOCKET_NAME)
        if exists(candidate):
            return candidate
    return DEFAULT_SOCKET_PATH


def discover_task(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """``$AZ_BATCH_TASK_DIR``, else the parent of ``$AZ_BATCH_TASK_WORKING_DIR`` if that ends
    in ``/wd``, else None."""
    env = os.environ if environ is None else environ
    task_dir = env.get("AZ_BATCH_TASK_DIR")
    if task_dir:
        return task_dir
    wd = (env.get("AZ_BATCH_TASK_WORKING_DIR") or "").rstrip("/")
    if wd.endswith("/wd") and len(wd) > 3:
        return wd[:-3]
    return None


def _retry_budget(environ: Mapping[str, str]) -> float:
    raw = environ.get(RETRY_SECS_ENV)
    if raw is None:
        return DEFAULT_RETRY_SECS
    try:
        secs = float(raw.strip())
    except ValueError:
        secs = -1.0
    if not 0.0 <= secs <= 86400.0:  # also rejects NaN
        raise ConfigError(
            "$%s must be a number of seconds such as 10 or 2.5, got %r" % (RETRY_SECS_ENV, raw)
        )
    return secs


class _Backoff:
    def __init__(self, budget: float) -> None:
        self._deadline = time.monotonic() + budget
        self._next = _BACKOFF_START

    def next_delay(self) -> Optional[float]:
        left = self._deadline - time.monotonic()
        if left <= 0:
            return None
        delay = min(self._next, left)
        self._next = min(self._next * 2, _BACKOFF_MAX)
        return delay


_TRANSIENT_CONNECT = (FileNotFoundError, ConnectionRefusedError, BlockingIOError)
_STALE = (BrokenPipeError, ConnectionResetError, EOFError)


class Client:
    """A connection to the nodeseal agent. Requests go one at a time over one socket, reopened
    transparently when the agent closed it. Not thread-safe: use one client per thread.

    :param socket_path: socket to use instead of discovering one.
    :param task: task directory to send as the request scope.
    :param retry_secs: retry budget for a missing/refusing socket and ``busy`` answers.
    :param timeout: seconds to wait for each send and each response.
    :param max_response_bytes: refuse longer response lines.
    :param environ: environment used for discovery (default ``os.environ``).
    """

    def __init__(
        self,
        socket_path: Optional[str] = None,
        task: Optional[str] = None,
        retry_secs: Optional[float] = None,
        timeout: float = DEFAULT_TIMEOUT_SECS,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        environ: Optional[Mapping[str, str]] = None,
    ) -> None:
        env = os.environ if environ is None else environ
        self.socket_path: str = socket_path or discover_socket(env)
        self.task: Optional[str] = task if task is not None else discover_task(env)
        self.retry_secs: float = retry_secs if retry_secs is not None else _retry_budget(env)
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self._sock: Optional[socket.socket] = None
        self._buf = bytearray()
        self._used = False
        self._next_id = 1

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (a later request reopens it)."""
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
                self._buf = bytearray()
                self._used = False

    # -- operations ------------------------------------------------------------------------

    def _scoped(self, op: str, **fields: Any) -> Dict[str, Any]:
        req: Dict[str, Any] = {"op": op}
        req.update(fields)
        if self.task is not None:
            req["task"] = self.task
        return req

    def get(self, name: str) -> Secret:
        """One value of the task, by variable name."""
        return Secret(self._field(self.request(self._scoped("get", name=name)), "value", str))

    def env(self) -> List[Tuple[str, Secret]]:
        """Every value of the task, in env-file order; raises the first failed value's error
        (naming every failed one) rather than return some values silently missing."""
        values, failed = self.env_partial()
        if failed:
            first = failed[0]
            others = ", ".join("%s (%s)" % (e.name, e.code) for e in failed[1:])
            message = "%s: %s" % (first.name, first.message)
            if others:
                message += "; also failed: " + others
            exc = type(first)(first.code, message)
            exc.retryable = first.retryable
            raise exc
        return values

    def env_partial(self) -> Tuple[List[Tuple[str, Secret]], List[AgentError]]:
        """The values that opened, and one error per value that did not (its ``name`` set):
        one bad value does not hide the others."""
        resp = self.request(self._scoped("env"))
        failed: List[AgentError] = []
        for item in resp.get("errors") or []:
            err = item.get("error") if isinstance(item, dict) else None
            if not (isinstance(err, dict) and isinstance(item.get("name"), str)):
                raise ProtocolError("`env` response with a malformed error entry")
            code = str(err.get("code"))
            exc = ERROR_CLASSES.get(code, AgentError)(code, str(err.get("message", "")))
            exc.retryable = bool(err.get("retryable"))
            exc.name = item["name"]  # type: ignore[attr-defined]
            failed.append(exc)
        values = self._field(resp, "values", list)
        out = []
        for item in values:
            if not (
                isinstance(item, dict)
                and isinstance(item.get("name"), str)
                and isinstance(item.get("value"), str)
            ):
                raise ProtocolError("`env` response with a malformed entry")
            out.append((item["name"], Secret(item["value"])))
        return out, failed

    def list(self) -> List[str]:
        """The task's variable names, never values."""
        names = self._field(self.request(self._scoped("list")), "names", list)
        if not all(isinstance(n, str) for n in names):
            raise ProtocolError("`list` response with a non-string name")
        return names

    def open(self, token: str, name: Optional[str] = None) -> Secret:
        """Decrypt a token the caller holds; ``name`` is the variable it will be used as.

        The task (if known) goes along: a token sealed for a job or task opens only for it."""
        req: Dict[str, Any] = self._scoped("open")
        req["token"] = token
        if name is not None:
            req["name"] = name
        return Secret(self._field(self.request(req), "value", str))

    def health(self) -> Dict[str, Any]:
        """``{"status":"ok","version":...,"keys":N,"tasks":N}``."""
        return self._field(self.request({"op": "health"}), "info", dict)

    def status(self) -> Dict[str, Any]:
        """Keys, tasks and counters (host root only)."""
        return self._field(self.request({"op": "status"}), "info", dict)

    def revoke(self, thumbprint: str, purge: bool = False) -> Dict[str, Any]:
        """Withdraw a key until restored (host root only)."""
        req = {"op": "revoke", "thumbprint": thumbprint, "purge": purge}
        return self._field(self.request(req), "info", dict)

    def restore(self, thumbprint: str) -> Dict[str, Any]:
        """Undo a revocation (host root only)."""
        return self._field(
            self.request({"op": "restore", "thumbprint": thumbprint}), "info", dict
        )

    @staticmethod
    def _field(resp: Dict[str, Any], field: str, kind: type) -> Any:
        value = resp.get(field)
        if not isinstance(value, kind):
            raise ProtocolError("response without a valid `%s`" % field)
        return value

    # -- transport -------------------------------------------------------------------------

    def request(self, op: Dict[str, Any]) -> Dict[str, Any]:
        """Send one request object (``op`` and its fields) and return the successful response;
        error responses raise the matching :class:`AgentError` subclass. ``busy`` is retried."""
        req_id = self._next_id
        self._next_id += 1
        req = {"v": PROTOCOL_VERSION, "id": req_id}
        req.update(op)
        line = json.dumps(req, separators=(",", ":")).encode("utf-8") + b"\n"
        backoff = _Backoff(self.retry_secs)
        reconnected = False
        while True:
            self._ensure_connected(backoff)
            was_used = self._used
            try:
                resp = self._exchange(line, req_id)
            except Busy:
                # The agent hangs up after a busy answer; retry on a new connection.
                self.close()
                delay = backoff.next_delay()
                if delay is None:
                    raise
                time.sleep(delay)
                continue
            except AgentError:
                self._used = True
                raise
            except (OSError, EOFError) as e:
                self.close()
                if was_used and not reconnected and isinstance(e, _STALE):
                    reconnected = True
                    continue
                raise ConnectionLost(
                    "lost the connection to the nodeseal agent at %s: %s"
                    % (self.socket_path, _describe(e))
                ) from None
            except NodesealError:
                # The stream may be mid-line; never reuse it.
                self.close()
                raise
            self._used = True
            return resp

    def _ensure_connected(self, backoff: _Backoff) -> None:
        while self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout if self.timeout else None)
            try:
                sock.connect(self.socket_path)
            except OSError as e:
                sock.close()
                delay = backoff.next_delay() if isinstance(e, _TRANSIENT_CONNECT) else None
                if delay is None:
                    raise Unreachable(self.socket_path, e) from None
                time.sleep(delay)
                continue
            self._sock = sock
            self._buf = bytearray()
            self._used = False

    def _exchange(self, line: bytes, req_id: int) -> Dict[str, Any]:
        assert self._sock is not None
        self._sock.sendall(line)
        scanned = 0
        while True:
            nl = self._buf.find(b"\n", scanned)
            if nl >= 0:
                if nl > self.max_response_bytes:
                    raise ProtocolError(_too_large(self.max_response_bytes))
                raw = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                return _decode(raw, req_id)
            scanned = len(self._buf)
            if scanned > self.max_response_bytes:
                raise ProtocolError(_too_large(self.max_response_bytes))
            chunk = self._sock.recv(_CHUNK)
            if not chunk:
                raise EOFError("the agent closed the connection without a complete answer")
            self._buf.extend(chunk)


def _describe(e: BaseException) -> str:
    if isinstance(e, socket.timeout):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _too_large(limit: int) -> str:
    return (
        "the nodeseal agent's response is longer than %d bytes; raise max_response_bytes "
        "if the task really holds that much" % limit
    )


def _decode(raw: bytes, req_id: int) -> Dict[str, Any]:
    try:
        resp = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        # Only the position: the raw line may hold a value.
        pos = getattr(e, "pos", getattr(e, "start", "?"))
        raise ProtocolError("malformed response at byte %s" % pos) from None
    if not isinstance(resp, dict):
        raise ProtocolError("response is not a JSON object")
    if resp.get("v") != PROTOCOL_VERSION:
        raise ProtocolError("response has protocol version %r, expected 1" % (resp.get("v"),))
    if "id" in resp and resp["id"] != req_id:
        raise ProtocolError("response id does not match request id %d" % req_id)
    if resp.get("ok") is True:
        return resp
    err = resp.get("error")
    if not isinstance(err, dict) or not isinstance(err.get("code"), str):
        raise ProtocolError("error response without a valid `error` object")
    code = err["code"]
    message = err.get("message") if isinstance(err.get("message"), str) else ""
    cls = ERROR_CLASSES.get(code)
    if cls is None:
        # A newer agent's code: keep it, honour its retryable flag.
        exc = AgentError(code, message)
        exc.retryable = bool(err.get("retryable"))
        raise exc
    raise cls(code, message)
