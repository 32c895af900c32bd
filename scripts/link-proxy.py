"""A byte-counting, shaping TCP proxy for scripts/link-bench (userspace,
no root, no netem).

Every byte each way is counted. With shaping, each direction is a link of
`rate` bytes/s with a one-way `delay`: a chunk read at t leaves at
max(t, when the previous chunk finished serialising) + len/rate + delay.
At most `queue` bytes wait per direction (a modem's buffer); beyond that
the proxy stops reading, so TCP back-pressure reaches the sender as on a
real narrow link.

Use as a module (`Proxy(...)`, `await proxy.start()`, `proxy.counts()`) or
run alone: python3 link-proxy.py LISTEN_PORT TARGET_PORT [RATE_BPS DELAY_MS]
"""

import asyncio
import sys
import time


class Proxy:
    def __init__(self, target_port, rate=None, delay=0.0, queue=64 * 1024):
        self.target_port = target_port
        self.rate = rate  # bytes/s per direction, None: unlimited
        self.delay = delay  # seconds, one way
        self.queue = queue
        self.up = 0  # client -> target
        self.down = 0  # target -> client
        self.conns = 0
        self.server = None
        self.port = None
        self.tasks = set()

    async def start(self, port=0):
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def counts(self):
        return self.up, self.down

    async def stop(self):
        self.server.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _conn(self, cr, cw):
        self.conns += 1
        try:
            tr, tw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            cw.close()
            return
        a = asyncio.ensure_future(self._pipe(cr, tw, True))
        b = asyncio.ensure_future(self._pipe(tr, cw, False))
        for t in (a, b):
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)
        await asyncio.wait([a, b], return_when=asyncio.FIRST_COMPLETED)
        for t in (a, b):
            t.cancel()
        for w in (tw, cw):
            w.close()

    async def _pipe(self, r, w, up):
        q = asyncio.Queue()
        room = asyncio.Event()  # set while the queue has room
        room.set()
        state = {"queued": 0, "busy_until": 0.0}

        async def sender():
            while True:
                due, data = await q.get()
                if data is None:
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                w.write(data)
                await w.drain()
                state["queued"] -= len(data)
                if state["queued"] <= self.queue:
                    room.set()

        s = asyncio.ensure_future(sender())
        try:
            while True:
                data = await r.read(16384)
                if not data:
                    break
                if up:
                    self.up += len(data)
                else:
                    self.down += len(data)
                if self.rate is None and self.delay == 0:
                    w.write(data)
                    await w.drain()
                    continue
                now = time.monotonic()
                start = max(now, state["busy_until"])
                done = start + (len(data) / self.rate if self.rate else 0.0)
                state["busy_until"] = done
                state["queued"] += len(data)
                q.put_nowait((done + self.delay, data))
                if state["queued"] > self.queue:
                    room.clear()
                    await room.wait()
            q.put_nowait((0, None))
            await s
        finally:
            s.cancel()
            try:
                w.write_eof()
            except (OSError, RuntimeError, AttributeError):
                pass


async def _main():
    listen, target = int(sys.argv[1]), int(sys.argv[2])
    rate = float(sys.argv[3]) if len(sys.argv) > 3 else None
    delay = float(sys.argv[4]) / 1000 if len(sys.argv) > 4 else 0.0
    p = await Proxy(target, rate, delay).start(listen)
    print(f"proxy 127.0.0.1:{p.port} -> {target}", flush=True)
    while True:
        await asyncio.sleep(1)
        print(f"up {p.up} down {p.down} conns {p.conns}", flush=True)


if __name__ == "__main__":
    asyncio.run(_main())
