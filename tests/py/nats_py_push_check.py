"""frond's push and ordered consumers against nats-py's JetStream client.

Usage: nats_py_push_check.py PORT
`js.subscribe("telemetry.push", durable=...)` (a push consumer found by
subject) receives and acks every message once, with nats-py's metadata
(sequences, num_pending); `js.subscribe(..., ordered_consumer=True)`
receives every message in order, then new ones as they arrive.
Exits 1 on failure.
"""
import asyncio
import sys

import nats

PORT = int(sys.argv[1])
TIMEOUT = 5


async def take(sub, n):
    out = []
    for _ in range(n):
        out.append(await sub.next_msg(timeout=TIMEOUT))
    return out


async def main():
    nc = await nats.connect(f"nats://127.0.0.1:{PORT}", connect_timeout=TIMEOUT)
    js = nc.jetstream(timeout=TIMEOUT)
    for i in range(5):
        await js.publish("telemetry.push", f"p{i}".encode())

    # Push, durable, explicit acks.
    sub = await js.subscribe("telemetry.push", durable="pypush", manual_ack=True)
    msgs = await take(sub, 5)
    assert [m.data for m in msgs] == [f"p{i}".encode() for i in range(5)], msgs
    md = msgs[0].metadata
    assert (md.stream, md.consumer) == ("TELEMETRY", "pypush"), md
    assert (md.sequence.stream, md.sequence.consumer, md.num_delivered) == (1, 1, 1), md
    assert [m.metadata.num_pending for m in msgs] == [4, 3, 2, 1, 0], msgs
    for m in msgs:
        await m.ack_sync()
    ci = await js.consumer_info("TELEMETRY", "pypush")
    assert ci.num_ack_pending == 0 and ci.ack_floor.stream_seq == 5, ci
    await sub.unsubscribe()

    # Ordered: every message in order, then a new one.
    osub = await js.subscribe("telemetry.push", ordered_consumer=True)
    got = await take(osub, 5)
    assert [m.data for m in got] == [f"p{i}".encode() for i in range(5)], got
    await js.publish("telemetry.push", b"p5")
    last = await osub.next_msg(timeout=TIMEOUT)
    assert last.data == b"p5", last
    assert last.metadata.sequence.consumer == 6, last.metadata
    await nc.close()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Exception as e:  # noqa: BLE001 - report any failure and exit 1
        print(f"FAIL: {type(e).__name__}: {e}")
        sys.exit(1)
    print("ok")
