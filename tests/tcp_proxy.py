"""A TCP proxy on 127.0.0.1 for fault tests: put it between a client and a real server and
cut every connection, as a network partition or a server restart does on the wire.

    proxy = TcpProxy(5432)            # upstream 127.0.0.1:5432
    await proxy.start()               # listens on 127.0.0.1:<proxy.port>
    url = f"postgresql://postgres@127.0.0.1:{proxy.port}/db"
    proxy.cut()                       # abort (RST) every open connection; refuse new ones
    proxy.restore()                   # accept again
    await proxy.cut_for(0.05)         # cut, wait 50 ms, restore
    await proxy.close()

While cut, new connections are accepted by the kernel and closed at once (the client reads
EOF before any byte), as a server that is restarting or a load balancer without backends
does. Generic: it knows nothing of the protocol it carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

__all__ = ["TcpProxy"]


class TcpProxy:
    """An asyncio TCP proxy to `upstream_host:upstream_port` that can cut connections."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.is_cut = False
        self.connections = 0  # accepted while not cut (proxied)
        self.refused = 0  # accepted while cut (closed at once)
        self.cuts = 0
        self._server: asyncio.base_events.Server | None = None
        self._pipes: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def cut(self) -> None:
        """Abort every current connection (both sides see a reset) and refuse new ones."""
        self.is_cut = True
        self.cuts += 1
        for client, upstream in list(self._pipes):
            _abort(client)
            _abort(upstream)
        self._pipes.clear()

    def restore(self) -> None:
        """Accept and proxy connections again."""
        self.is_cut = False

    async def cut_for(self, seconds: float) -> None:
        """Cut, wait `seconds`, restore."""
        self.cut()
        try:
            await asyncio.sleep(seconds)
        finally:
            self.restore()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_cut:
            self.refused += 1
            _abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _abort(writer)
            return
        if self.is_cut:  # cut while connecting upstream
            _abort(writer)
            _abort(up_writer)
            return
        self.connections += 1
        pair = (writer, up_writer)
        self._pipes.add(pair)
        me = asyncio.current_task()
        if me is not None:
            self._tasks.add(me)
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            self._pipes.discard(pair)
            for w in pair:
                _abort(w)
            if me is not None:
                self._tasks.discard(me)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a dropped connection looks to a client."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(Exception):
        writer.transport.abort()
