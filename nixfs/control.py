"""A small control channel between nixfs commands and a running daemon.

The daemon listens on a Unix socket in its runtime folder (mode 0700, so only
the mounting user and root reach it); its path is in the daemon's record.  A
request is one JSON line, the answer one JSON line.
"""

import json
import logging
import os
import socket
import time

import trio

from . import runtime

log = logging.getLogger(__name__)


class ControlError(Exception):
    """No daemon answered, or it answered with an error."""


def socket_path(mountpoint: str) -> str:
    return str(runtime.runtime_dir() / (runtime.record_key(mountpoint) + ".sock"))


class ControlServer:
    """Daemon side: answers requests with the handlers given."""

    def __init__(self, path: str, handlers: dict):
        self.path = path
        self.handlers = handlers

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(self.path)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        task_status.started()
        try:
            await trio.serve_listeners(self._handle, [listener])
        finally:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    async def _handle(self, stream) -> None:
        async with stream:
            data = b""
            while not data.endswith(b"\n"):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            try:
                request = json.loads(data)
                handler = self.handlers[request.pop("op")]
                answer = {"ok": True, "result": await handler(**request)}
            except Exception as e:  # the daemon must keep running whatever is asked
                log.warning("control request failed: %s", e)
                answer = {"ok": False, "error": str(e)}
            await stream.send_all(json.dumps(answer).encode() + b"\n")


def request(mountpoint: str, op: str, timeout: float = 600.0, **args):
    """Send one request to the daemon serving *mountpoint*; return its result."""
    info = runtime.read_record(mountpoint)
    if info is None:
        raise ControlError(f"no nixfs daemon serves {mountpoint}")
    path = info.get("control")
    if not path:
        raise ControlError(f"the daemon serving {mountpoint} has no control socket")
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as e:
            raise ControlError(f"cannot reach the daemon serving {mountpoint}: {e}") from None
        sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            if time.monotonic() > deadline:
                raise ControlError("the daemon did not answer in time")
            chunk = sock.recv(65536)
            if not chunk:
                raise ControlError("the daemon closed the connection")
            data += chunk
    answer = json.loads(data)
    if not answer.get("ok"):
        raise ControlError(answer.get("error", "unknown error"))
    return answer["result"]
