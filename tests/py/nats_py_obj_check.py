"""frond's Object Store against nats-py's unmodified object store client.

Usage: nats_py_obj_check.py PORT
`js.create_object_store`, put of bytes (also empty) and of a file-like object
(several chunks), get (into memory and into a file, nats-py checks the digest),
info, list, watch (a put and a delete seen as they happen), delete (info
then reports it deleted, list leaves it out). Exits 1 on failure.
"""
import asyncio
import hashlib
import io
import sys
import tempfile

import nats
from nats.js.errors import NotFoundError, ObjectDeletedError

PORT = int(sys.argv[1])
TIMEOUT = 5
# Several of nats-py's 128 KiB chunks and a partial one.
BIG = bytes((i * 7 + i // 251) % 256 for i in range(3 * 128 * 1024 + 99))


async def main():
    nc = await nats.connect(f"nats://127.0.0.1:{PORT}", connect_timeout=TIMEOUT)
    js = nc.jetstream(timeout=TIMEOUT)
    obs = await js.create_object_store("pyblobs")

    info = await obs.put("small", b"hello object")
    assert (info.size, info.chunks) == (12, 1), info
    info = await obs.put("empty", b"")
    assert (info.size, info.chunks) == (0, 0), info
    info = await obs.put("big", io.BytesIO(BIG))
    assert (info.size, info.chunks) == (len(BIG), 4), info

    got = await obs.get("small")
    assert got.data == b"hello object", got.info
    with tempfile.TemporaryFile() as f:
        await obs.get("big", writeinto=f)
        f.seek(0)
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(BIG).digest()
    got = await obs.get("big")
    assert got.data == BIG
    got = await obs.get("empty")
    assert got.data == b"" and got.info.size == 0, got.info

    i = await obs.get_info("big")
    assert (i.name, i.size, i.bucket) == ("big", len(BIG), "pyblobs"), i
    names = sorted(e.name for e in await obs.list())
    assert names == ["big", "empty", "small"], names

    w = await obs.watch(include_history=False, updates_only=True)
    await obs.put("third", b"3")
    e = await w.updates(timeout=TIMEOUT)
    assert (e.name, e.size, bool(e.deleted)) == ("third", 1, False), e
    await obs.delete("small")
    e = await w.updates(timeout=TIMEOUT)
    assert (e.name, bool(e.deleted)) == ("small", True), e
    await w.stop()

    try:
        await obs.get("small")
        raise AssertionError("get of a deleted object succeeded")
    except (ObjectDeletedError, NotFoundError):
        pass
    names = sorted(e.name for e in await obs.list(ignore_deletes=True))
    assert names == ["big", "empty", "third"], names
    st = await js.stream_info("OBJ_pyblobs", subjects_filter="$O.pyblobs.C.>")
    assert sum((st.state.subjects or {}).values()) == 4 + 1, st.state
    await js.delete_object_store("pyblobs")
    await nc.close()
    print("ok")


try:
    asyncio.run(asyncio.wait_for(main(), 60))
except Exception as e:  # noqa: BLE001 - report any failure
    print(f"FAIL: {type(e).__name__}: {e}")
    raise SystemExit(1)
