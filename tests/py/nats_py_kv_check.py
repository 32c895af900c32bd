"""frond's Key/Value against nats-py's KV API, unmodified.

Usage: nats_py_kv_check.py PORT
`js.create_key_value`, put/get/create/update/delete, `kv.watch` (the
initial values, the None marker that ends them, then live updates),
`kv.keys`, `kv.history` and `kv.purge_deletes`, with exact values and
revisions.
Exits 1 on failure.
"""
import asyncio
import sys

import nats
import nats.js.errors

PORT = int(sys.argv[1])
TIMEOUT = 5


async def main():
    nc = await nats.connect(f"nats://127.0.0.1:{PORT}", connect_timeout=TIMEOUT)
    js = nc.jetstream(timeout=TIMEOUT)
    kv = await js.create_key_value(bucket="pycfg", history=5)

    assert await kv.put("a", b"1") == 1
    assert await kv.put("b", b"2") == 2
    assert await kv.put("a", b"3") == 3
    e = await kv.get("a")
    assert (e.key, e.value, e.revision) == ("a", b"3", 3), e
    assert await kv.create("c", b"c1") == 4
    try:
        await kv.create("a", b"x")
        raise AssertionError("create of an existing key succeeded")
    except nats.js.errors.KeyWrongLastSequenceError:
        pass
    try:
        await kv.update("a", b"x", last=1)
        raise AssertionError("update at a stale revision succeeded")
    except nats.js.errors.KeyWrongLastSequenceError:
        pass
    assert await kv.update("a", b"4", last=3) == 5
    await kv.delete("b")
    try:
        await kv.get("b")
        raise AssertionError("deleted key still readable")
    except nats.js.errors.KeyNotFoundError as err:
        # nats-py reports a delete marker as not found, with its revision.
        assert (err.op, err.entry.revision) == ("DEL", 6), (err.op, err.entry)
    try:
        await kv.get("nope")
        raise AssertionError("missing key readable")
    except nats.js.errors.KeyNotFoundError as err:
        assert err.op is None, err.op

    # watch (last value per key by default): initial values, None, updates.
    w = await kv.watchall()
    initial = []
    while True:
        u = await w.updates(timeout=TIMEOUT)
        if u is None:
            break
        initial.append((u.key, u.value, u.revision, u.operation))
    assert initial == [
        ("c", b"c1", 4, None),
        ("a", b"4", 5, None),
        ("b", b"", 6, "DEL"),
    ], initial
    await kv.put("d", b"d1")
    u = await w.updates(timeout=TIMEOUT)
    assert (u.key, u.value, u.revision) == ("d", b"d1", 7), u
    await w.stop()

    # An empty bucket's watcher says None at once.
    empty = await js.create_key_value(bucket="pyempty")
    we = await empty.watchall()
    assert await we.updates(timeout=TIMEOUT) is None
    await we.stop()

    assert sorted(await kv.keys()) == ["a", "c", "d"]
    h = await kv.history("a")
    assert [(x.value, x.revision) for x in h] == [(b"1", 1), (b"3", 3), (b"4", 5)], h

    # purge_deletes: b's delete marker and history go, the rest stays.
    assert await kv.purge_deletes(olderthan=-1)
    try:
        await kv.history("b")
        raise AssertionError("b's history survived purge_deletes")
    except nats.js.errors.NoKeysError:
        pass
    assert sorted(await kv.keys()) == ["a", "c", "d"]

    assert await js.delete_key_value("pycfg")
    await nc.close()


try:
    asyncio.run(asyncio.wait_for(main(), 60))
except Exception as e:  # noqa: BLE001 - report any failure
    import traceback

    traceback.print_exc()
    print(f"FAIL: {e!r}")
    sys.exit(1)
print("ok")
