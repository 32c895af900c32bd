"""frond's JetStream API against nats-py's JetStream client.

Usage: nats_py_js_check.py PORT
Publishes through JetStream, reads stream info and a message, then a
durable pull subscription (found by subject) fetches and acks; checks the
consumer's ack floor and that nothing is left; then creates, updates and
deletes a stream over the API. Exits 1 on failure.
"""
import asyncio
import sys

import nats
import nats.errors
import nats.js.errors

PORT = int(sys.argv[1])
TIMEOUT = 5


async def main():
    nc = await nats.connect(f"nats://127.0.0.1:{PORT}", connect_timeout=TIMEOUT)
    js = nc.jetstream(timeout=TIMEOUT)
    for i in range(3):
        ack = await js.publish("telemetry.py", f"p{i}".encode())
        assert (ack.stream, ack.seq) == ("TELEMETRY", i + 1), ack
    info = await js.stream_info("TELEMETRY")
    assert info.state.messages == 3, info.state
    msg = await js.get_msg("TELEMETRY", 2)
    assert (msg.subject, msg.data) == ("telemetry.py", b"p1"), msg
    try:
        await js.stream_info("NOPE")
        raise AssertionError("stream NOPE exists")
    except nats.js.errors.NotFoundError:
        pass

    psub = await js.pull_subscribe("telemetry.py", durable="pyd")
    msgs = await psub.fetch(3, timeout=TIMEOUT)
    assert [m.data for m in msgs] == [b"p0", b"p1", b"p2"], msgs
    assert msgs[0].metadata.sequence.stream == 1, msgs[0].metadata
    for m in msgs:
        await m.ack_sync()
    ci = await js.consumer_info("TELEMETRY", "pyd")
    assert ci.ack_floor.stream_seq == 3 and ci.num_ack_pending == 0, ci
    try:
        extra = await psub.fetch(1, timeout=0.5)
        raise AssertionError(f"unexpected {extra}")
    except nats.errors.TimeoutError:
        pass
    await streams_over_the_api(js)
    await nc.close()


async def streams_over_the_api(js):
    """add_stream / update_stream / delete_stream (issue 13)."""
    info = await js.add_stream(name="ORDERS", subjects=["orders.>"])
    assert info.config.subjects == ["orders.>"], info.config
    # The same config again is idempotent.
    await js.add_stream(name="ORDERS", subjects=["orders.>"])
    for i in range(3):
        ack = await js.publish("orders.new", f"o{i}".encode())
        assert (ack.stream, ack.seq) == ("ORDERS", i + 1), ack
    try:
        await js.add_stream(name="CLASH", subjects=["orders.eu"])
        raise AssertionError("overlapping subjects accepted")
    except nats.js.errors.BadRequestError as e:
        assert e.err_code == 10065, e
    info = await js.update_stream(name="ORDERS", subjects=["orders.>"], max_msgs=2)
    # The new limit applies at once, as in nats-server.
    assert info.config.max_msgs == 2 and info.state.messages == 2, info
    await js.publish("orders.new", b"o3")
    info = await js.stream_info("ORDERS")
    assert (info.state.messages, info.state.first_seq) == (2, 3), info.state
    try:
        await js.delete_stream("TELEMETRY")
        raise AssertionError("frond.toml stream deleted over the API")
    except nats.js.errors.BadRequestError as e:
        assert e.err_code == 10052 and "frond.toml" in e.description, e
    assert await js.delete_stream("ORDERS")
    try:
        await js.stream_info("ORDERS")
        raise AssertionError("ORDERS still exists")
    except nats.js.errors.NotFoundError:
        pass


try:
    asyncio.run(main())
except AssertionError as e:
    print(f"FAILED: {e!r}")
    sys.exit(1)
