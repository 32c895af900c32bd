"""MQTT over WebSocket round trip with paho-mqtt (a real peer).

Usage: ws_roundtrip.py PORT [CAFILE]
With CAFILE the connection is WebSocket over TLS (wss), trusting CAFILE.
Subscribes to ws/test over WebSocket (subprotocol mqtt), publishes 20 QoS 1
messages on it, and exits 0 once all 20 came back in order, 1 otherwise.
"""
import sys
import threading

import paho.mqtt.client as mqtt

port = int(sys.argv[1])
got = []
done = threading.Event()
subscribed = threading.Event()


def on_connect(client, userdata, flags, reason, properties):
    client.subscribe("ws/test", qos=1)


def on_subscribe(client, userdata, mid, reason_codes, properties):
    subscribed.set()


def on_message(client, userdata, msg):
    got.append(msg.payload.decode())
    if len(got) == 20:
        done.set()


c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="ws-peer", transport="websockets",
                protocol=mqtt.MQTTv311)
c.on_connect = on_connect
c.on_subscribe = on_subscribe
c.on_message = on_message
if len(sys.argv) > 2:
    c.tls_set(ca_certs=sys.argv[2])
c.connect("127.0.0.1", port, keepalive=30)
c.loop_start()
if not subscribed.wait(10):
    print("no SUBACK within 10 s", file=sys.stderr)
    sys.exit(1)
for i in range(20):
    c.publish("ws/test", f"m{i}", qos=1).wait_for_publish(10)
ok = done.wait(10)
c.loop_stop()
c.disconnect()
expected = [f"m{i}" for i in range(20)]
if not ok or got != expected:
    print(f"got {got}", file=sys.stderr)
    sys.exit(1)
print("ok")
