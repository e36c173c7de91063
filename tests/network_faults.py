"""An S3 endpoint that can go away and come back: a TCP forwarder on loopback in front of the real one.

The forwarder runs in a process of its own. `cut()` makes it drop every open connection and reset each new one
at once (what a client sees when the endpoint goes away); `restore()` makes it forward again. It counts the
connections it refused, so a test can wait until clients have really tried during the outage instead of
waiting for a time. The server behind it keeps its state throughout.

Run as a script: `python network_faults.py LISTEN_PORT TARGET_PORT REFUSALS_FILE`; SIGUSR1 cuts, SIGUSR2
restores, each refused connection appends one byte to REFUSALS_FILE.
"""

import asyncio
import signal
import socket
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from s3_endpoint import free_port

CHUNK = 1 << 16


class Forwarder:
    def __init__(self, target_port: int, refusals: Path):
        self.target_port = target_port
        self.refusals = refusals
        self.cut = False
        self.open_writers: set[asyncio.StreamWriter] = set()

    @staticmethod
    def _reset(writer: asyncio.StreamWriter) -> None:
        """Close with an RST rather than a FIN, as a vanished host's network stack would answer."""
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    def go_away(self) -> None:
        self.cut = True
        for writer in list(self.open_writers):
            self._reset(writer)
        self.open_writers.clear()

    def come_back(self) -> None:
        self.cut = False

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(CHUNK):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if writer in self.open_writers:
                self.open_writers.discard(writer)
                writer.close()

    def _refuse(self, client_writer: asyncio.StreamWriter) -> None:
        with self.refusals.open("ab") as counter:
            counter.write(b".")
        self._reset(client_writer)

    async def handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self.cut:
            self._refuse(client_writer)
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            self._reset(client_writer)
            return
        if self.cut:  # cut while this connection was reaching the server: nothing may pass during the outage
            self._reset(upstream_writer)
            self._refuse(client_writer)
            return
        self.open_writers.update((client_writer, upstream_writer))
        await asyncio.gather(self._pump(client_reader, upstream_writer), self._pump(upstream_reader, client_writer))


async def serve(listen_port: int, target_port: int, refusals: Path) -> None:
    forwarder = Forwarder(target_port, refusals)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, forwarder.go_away)
    loop.add_signal_handler(signal.SIGUSR2, forwarder.come_back)
    server = await asyncio.start_server(forwarder.handle, "127.0.0.1", listen_port, reuse_address=True)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


class CuttableEndpoint:
    """Handle on a running forwarder: `url` to give clients, `cut()` / `restore()`, `refusals()` so far."""

    def __init__(self, process: subprocess.Popen, url: str, refusals: Path):
        self.process, self.url, self._refusals = process, url, refusals

    def cut(self) -> None:
        self.process.send_signal(signal.SIGUSR1)

    def restore(self) -> None:
        self.process.send_signal(signal.SIGUSR2)

    def refusals(self) -> int:
        return self._refusals.stat().st_size if self._refusals.exists() else 0

    def wait_for_refusals(self, count: int, timeout: float = 300.0) -> int:
        """Block until clients have been refused `count` times (they are retrying) or fail after `timeout`."""
        deadline = time.monotonic() + timeout
        while self.refusals() < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.refusals()} connection attempt(s) during the outage")
            time.sleep(0.05)
        return self.refusals()


@contextmanager
def cuttable_endpoint(target_url: str, workdir: Path):
    """A forwarder on a free loopback port in front of `target_url` (`http://127.0.0.1:PORT`)."""
    target_port = int(target_url.rsplit(":", 1)[1])
    port = free_port()
    refusals = workdir / f"refusals-{port}"
    process = subprocess.Popen([sys.executable, __file__, str(port), str(target_port), str(refusals)],
                               stdout=subprocess.PIPE, text=True)
    try:
        if process.stdout.readline().strip() != "ready":
            raise RuntimeError("the TCP forwarder did not start")
        yield CuttableEndpoint(process, f"http://127.0.0.1:{port}", refusals)
    finally:
        process.terminate()
        process.wait(timeout=30)


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])))
