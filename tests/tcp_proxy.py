"""A TCP proxy on 127.0.0.1 for fault tests and bench/chaos.py: put it between a client and a
real server (PostgreSQL, Redis, ...) and cut, black-hole or restore the path on demand.

    proxy = await TcpProxy("127.0.0.1", 5432).start()   # listens on 127.0.0.1:<proxy.port>
    url = f"postgresql://postgres@127.0.0.1:{proxy.port}/db"
    proxy.cut()                  # abort (RST) every open connection; new ones are reset at once
    proxy.restore()              # accept and forward again
    await proxy.refuse()         # cut, and close the listening port: connects get ECONNREFUSED
    await proxy.reopen()         # listen again on the same port
    proxy.blackhole()            # connections stay open but no byte moves (a hung server)
    await proxy.cut_for(0.05)    # cut, wait 50 ms, restore
    await proxy.close()

What the client sees is what a real outage does on the wire: a partition or a server restart
resets open connections; a server host that is up without its service refuses connects; a
load balancer without backends accepts and closes; a hung server accepts bytes and never
answers. Generic: it knows nothing of the protocol it carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct

__all__ = ["TcpProxy"]


class TcpProxy:
    """An asyncio TCP proxy from 127.0.0.1:`port` to `target_host`:`target_port`."""

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = port  # 0 until started: a free port is picked, kept across reopen()
        self.is_cut = False
        self.connections = 0  # accepted while not cut (proxied)
        self.refused = 0  # accepted while cut (reset at once)
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    @property
    def accepted(self) -> int:
        return self.connections

    async def start(self) -> TcpProxy:
        if self.port:
            self._server = await asyncio.start_server(self._accept, self.host, self.port)
            return self
        # A port outside the kernel's ephemeral range: while `refuse()` has it closed, no
        # outgoing connection can be given it as its source port, so `reopen()` gets it back.
        low = _ephemeral_low()
        for port in random.sample(range(10_000, low), min(200, low - 10_000)):
            try:
                self._server = await asyncio.start_server(self._accept, self.host, port)
            except OSError:
                continue
            self.port = port
            return self
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def cut(self) -> None:
        """Abort every current connection (both sides see a reset) and reset new ones."""
        self.is_cut = True
        self.cuts += 1
        for client, upstream in list(self._pipes):
            _abort(client)
            _abort(upstream)
        self._pipes.clear()
        self._flowing.set()  # pumps of aborted connections must not wait on a black hole

    def blackhole(self) -> None:
        """Keep connections open but move no byte until `restore()` (reads time out)."""
        self._flowing.clear()

    def restore(self) -> None:
        """Forward bytes and accept connections again."""
        self.is_cut = False
        self._flowing.set()

    async def refuse(self) -> None:
        """Cut, and close the listening port: connects are refused until `reopen()`."""
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def reopen(self) -> None:
        """Listen again on the same port and forward."""
        if self._server is None:
            await self.start()
        self.restore()

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
        # close() cancels the connection tasks; asyncio's stream server would log a
        # cancelled handler as an error, so a cancelled connection just ends here.
        with contextlib.suppress(asyncio.CancelledError):
            await self._serve(reader, writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_cut:
            self.refused += 1
            _abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
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
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        finally:
            self._pipes.discard(pair)
            for w in pair:
                _abort(w)
            if me is not None:
                self._tasks.discard(me)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()  # a black hole holds the bytes
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                if writer.can_write_eof():
                    writer.write_eof()


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out as a source port (Linux; 32768 elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return max(10_001, int(f.read().split()[0]))
    except (OSError, ValueError, IndexError):
        return 32_768


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a dropped connection looks to a client."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(Exception):
        writer.transport.abort()
