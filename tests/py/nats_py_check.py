"""frond's NATS port against nats-py (the official Python client).

Usage: nats_py_check.py PORT
Checks pub/sub with `*` and `>` wildcards, a queue group (each message to
one member, both members used), request/reply, and headers. Prints what
failed and exits 1, or exits 0.
"""
import asyncio
import sys

import nats

PORT = int(sys.argv[1])
TIMEOUT = 5


async def collect(sub, n):
    out = []
    for _ in range(n):
        out.append(await sub.next_msg(timeout=TIMEOUT))
    return out


async def main():
    nc = await nats.connect(f"nats://127.0.0.1:{PORT}", connect_timeout=TIMEOUT)

    # Wildcards.
    star = await nc.subscribe("py.*.temp")
    full = await nc.subscribe("py.>")
    await nc.flush()
    await nc.publish("py.room1.temp", b"21")
    await nc.publish("py.room2.humidity", b"40")
    await nc.flush()
    m = await star.next_msg(timeout=TIMEOUT)
    assert (m.subject, m.data) == ("py.room1.temp", b"21"), m
    got = [m.subject for m in await collect(full, 2)]
    assert got == ["py.room1.temp", "py.room2.humidity"], got
    try:
        extra = await star.next_msg(timeout=0.2)
        raise AssertionError(f"py.*.temp matched {extra.subject}")
    except nats.errors.TimeoutError:
        pass

    # Queue group: 100 messages, each to exactly one of two members.
    counts = [[], []]

    def member(k):
        async def cb(msg):
            counts[k].append(int(msg.data))
        return cb

    await nc.subscribe("work", queue="workers", cb=member(0))
    await nc.subscribe("work", queue="workers", cb=member(1))
    await nc.flush()
    for i in range(100):
        await nc.publish("work", str(i).encode())
    # A round trip after the publishes, then let the callbacks run.
    await nc.flush()
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while len(counts[0]) + len(counts[1]) < 100:
        assert asyncio.get_running_loop().time() < deadline, counts
        await asyncio.sleep(0.01)
    seen = sorted(counts[0] + counts[1])
    assert seen == list(range(100)), seen
    assert counts[0] and counts[1], counts

    # Request/reply.
    async def echo(msg):
        await msg.respond(b"re:" + msg.data)

    await nc.subscribe("svc.echo", cb=echo)
    await nc.flush()
    for i in range(10):
        r = await nc.request("svc.echo", f"q{i}".encode(), timeout=TIMEOUT)
        assert r.data == f"re:q{i}".encode(), r.data
    try:
        await nc.request("svc.nobody", b"", timeout=TIMEOUT)
        raise AssertionError("request without responders succeeded")
    except nats.errors.NoRespondersError:
        pass

    # Headers.
    hs = await nc.subscribe("py.headers")
    await nc.flush()
    await nc.publish("py.headers", b"body", headers={"X-Trace": "abc", "Nats-Msg-Id": "42"})
    m = await hs.next_msg(timeout=TIMEOUT)
    assert m.data == b"body", m.data
    assert m.headers is not None and m.headers.get("X-Trace") == "abc", m.headers
    assert m.headers.get("Nats-Msg-Id") == "42", m.headers

    await nc.close()


try:
    asyncio.run(main())
except Exception as e:  # report any failure with its kind
    print(f"nats-py check failed: {type(e).__name__}: {e}")
    sys.exit(1)
print("ok")
