"""A TCP proxy the tests can cut or slow down: a server that vanishes from (or moves
away from) one client's view only."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit


class TcpProxy:
    """Forwards ``host``:<port> to a target until :meth:`cut`; :meth:`heal` reopens.

    The target is ``(host, port)`` or a Unix socket's path; :attr:`delay` holds every
    chunk that long in each direction (0.1 s makes a 200 ms round trip).
    """

    def __init__(self, target_url: str, *, host: str = "127.0.0.1") -> None:
        parts = urlsplit(target_url)
        self.target: tuple[str, int] | str = (parts.hostname or "127.0.0.1", parts.port or 4222)
        self._scheme = parts.scheme
        self._host = host
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.delay = 0.0

    @property
    def url(self) -> str:
        return f"{self._scheme}://{self._host}:{self.port}"

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, self._host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def cut(self) -> None:
        """Refuse new connections and drop the open ones."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in self._links:
            writer.transport.abort()
        self._links.clear()

    async def heal(self) -> None:
        await self.start()  # the same port

    async def close(self) -> None:
        self.cut()
        for task in self._tasks:
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if isinstance(self.target, str):
                up_reader, up_writer = await asyncio.open_unix_connection(self.target)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._links |= {writer, up_writer}
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            chunks: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
            for job in (self._read(source, chunks), self._write(chunks, sink)):
                task = asyncio.create_task(job)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _read(
        self, source: asyncio.StreamReader, chunks: asyncio.Queue[tuple[float, bytes] | None]
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await source.read(65536):
                chunks.put_nowait((loop.time() + self.delay, data))
        except (ConnectionError, OSError):
            pass
        finally:
            chunks.put_nowait(None)

    async def _write(
        self, chunks: asyncio.Queue[tuple[float, bytes] | None], sink: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (chunk := await chunks.get()) is not None:
                due, data = chunk
                await asyncio.sleep(due - loop.time())  # in order: each is due after the last
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.transport.abort()
