"""A byte-counting TCP relay: what really crosses the network between SuperNodes and a SuperLink.

SuperNodes are pointed at the relay's address instead of the SuperLink's Fleet API; the relay
forwards every byte unchanged (TLS included: it never sees plaintext and needs no certificate) and
records, per chunk, when it passed and in which direction. Counting by time window then gives the
bytes of one round, of an idle period (polling and heartbeats), and the connections opened.

A measuring tool of ``bench_deploy_bytes.py`` (and tested in tests/test_deploy.py), not part of the package:
fedcsg itself never relays.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass

UP = "up"  # SuperNode -> SuperLink
DOWN = "down"  # SuperLink -> SuperNode


@dataclass(frozen=True)
class Traffic:
    """Bytes and connections seen by the relay in a time window."""

    up: int
    down: int
    connections: int
    seconds: float

    @property
    def total(self) -> int:
        return self.up + self.down


class ByteCountingRelay:
    """Forward ``listen_host:listen_port`` to ``target_host:target_port`` and count bytes each way.

    Runs its own asyncio loop in a daemon thread, so a synchronous test or benchmark can start it,
    run Flower processes against it and read the counts. Use as a context manager or call
    :meth:`start` / :meth:`stop`.

    Parameters
    ----------
    target_host, target_port
        The SuperLink's Fleet API.
    listen_host, listen_port
        Where SuperNodes connect (port 0: a free one, see :attr:`address` after start).
    chunk_size
        Read size per forward step.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        chunk_size: int = 1 << 16,
    ) -> None:
        self.target = (target_host, target_port)
        self.listen = (listen_host, listen_port)
        self.chunk_size = chunk_size
        self._lock = threading.Lock()
        self._events: list[tuple[float, str, int]] = []
        self._opened: list[float] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self.port: int = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def address(self) -> str:
        return f"{self.listen[0]}:{self.port}"

    def start(self) -> ByteCountingRelay:
        if self._thread is not None:
            raise RuntimeError("relay already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="byte-counting-relay", daemon=True)
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._serve(), loop)
        self.port = future.result(timeout=10)
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> ByteCountingRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ counting

    def now(self) -> float:
        """The relay's clock (``time.monotonic``), for window boundaries."""
        return time.monotonic()

    def traffic(self, start: float | None = None, end: float | None = None) -> Traffic:
        """Bytes each way and connections opened in ``(start, end]`` (None: unbounded)."""
        lo = float("-inf") if start is None else start
        hi = float("inf") if end is None else end
        with self._lock:
            up = sum(n for t, d, n in self._events if lo < t <= hi and d == UP)
            down = sum(n for t, d, n in self._events if lo < t <= hi and d == DOWN)
            opened = sum(1 for t in self._opened if lo < t <= hi)
            first = self._events[0][0] if self._events else 0.0
            last = self._events[-1][0] if self._events else 0.0
        seconds = (min(hi, last) if end is None else hi) - (max(lo, first) if start is None else lo)
        return Traffic(up, down, opened, max(seconds, 0.0))

    # ------------------------------------------------------------------ asyncio side

    async def _serve(self) -> int:
        self._server = await asyncio.start_server(self._handle, *self.listen)
        return int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=2)

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._lock:
            self._opened.append(time.monotonic())
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(
                self._pipe(client_reader, server_writer, UP),
                self._pipe(server_reader, client_writer, DOWN),
            )
        finally:
            for writer in (client_writer, server_writer):
                writer.close()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        try:
            while chunk := await reader.read(self.chunk_size):
                with self._lock:
                    self._events.append((time.monotonic(), direction, len(chunk)))
                writer.write(chunk)
                await writer.drain()
            # Half-close: pass the peer's end-of-stream on, as TLS close_notify and HTTP expect.
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.close()
