"""A TCP proxy on 127.0.0.1 for fault tests: put it between a client and a real server
(Redis, PostgreSQL, ...) and cut, black-hole or restore the path on demand.

    async with TcpProxy("127.0.0.1", 6379) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        ...
        await proxy.cut()        # every open connection closed, new ones refused (port closed)
        await proxy.restore()    # accepting again on the same port
        proxy.blackhole()        # connections stay open but no byte moves (a hung server)
        await proxy.restore()    # bytes flow again

What the client sees is what a real outage does on the wire: `cut()` closes the sockets
(the client reads EOF / gets a reset) and closes the listening port (connects are refused
with ECONNREFUSED); `blackhole()` makes reads time out.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target_host`:`target_port`, one task pair per connection."""

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = port  # 0 until started: the OS picks a free port, kept across restore()
        self.accepted = 0  # connections accepted since start
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    @property
    def is_cut(self) -> bool:
        return self._server is None

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, self.host, self.port,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def cut(self) -> None:
        """Close every open connection and the listening port: new connects are refused."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._flowing.set()

    def blackhole(self) -> None:
        """Keep connections (and accepting) but forward nothing: the server looks hung."""
        self._flowing.clear()

    async def restore(self) -> None:
        """Forward again (after `cut` the same port accepts again)."""
        self._flowing.set()
        if self._server is None:
            await self.start()

    async def close(self) -> None:
        await self.cut()

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                await self._flowing.wait()
                dst.write(data)
                await dst.drain()
        except OSError:
            pass  # the other side went away: close ours below
        finally:
            self._writers.discard(dst)
            with contextlib.suppress(OSError, RuntimeError):
                dst.close()
