"""A Sparkplug B observer for tests/sparkplug.rs, on an independent
implementation: pysparkplug (its payload classes and the protobuf code
generated from the specification's sparkplug_b.proto) over paho-mqtt.

Subscribes to spBv1.0/<group>/# and prints one JSON line per message, decoded
by pysparkplug (DDATA with the device's DBIRTH, as a host does: data messages
carry no datatypes). Reads commands on stdin, one per line:
  rebirth         publish an NCMD `Node Control/Rebirth` = true, encoded by pysparkplug
  state online    publish this host's STATE (Sparkplug 3.0, retained) online, timestamp now
  state offline   ... offline, timestamp now
  state stale     ... offline, with a timestamp older than the last online one
  quit            disconnect and exit
"""

import argparse
import json
import sys
import threading

import paho.mqtt.client as mqtt
import pysparkplug as spb
from pysparkplug import _protobuf as _pb


def out(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def metric_json(m):
    return {
        "name": m.name,
        "datatype": m.datatype.name,
        "value": m.value,
        "timestamp": m.timestamp,
        "is_historical": m.is_historical,
        "is_null": m.is_null,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--node", required=True)
    ap.add_argument("--host-id", default=None)
    args = ap.parse_args()
    last_online = [0]

    births = {}  # device id (or None for the node) -> its last birth
    lock = threading.Lock()

    def on_connect(client, userdata, flags, rc):
        client.subscribe(f"spBv1.0/{args.group}/#", qos=1)

    def on_subscribe(client, userdata, mid, granted):
        out({"type": "ready"})

    def on_message(client, userdata, msg):
        with lock:
            try:
                topic = spb.Topic.from_str(msg.topic)
                kind = str(topic.message_type)
                device = topic.device_id
                birth = births.get(device) if kind in ("DDATA", "NDATA") else None
                payload = topic.message_type.payload.decode(msg.payload, birth=birth)
                if kind in ("NBIRTH", "DBIRTH"):
                    births[device] = payload
                rec = {
                    "type": kind,
                    "topic": msg.topic,
                    "node": topic.edge_node_id,
                    "device": device,
                    "qos": msg.qos,
                    "retain": bool(msg.retain),
                    "seq": getattr(payload, "seq", None),
                    "has_seq": _pb.Payload.FromString(msg.payload).HasField("seq"),
                    "timestamp": getattr(payload, "timestamp", None),
                }
                if kind == "NDEATH":
                    rec["metrics"] = [metric_json(payload.bd_seq_metric)]
                else:
                    rec["metrics"] = [metric_json(m) for m in getattr(payload, "metrics", ())]
                out(rec)
            except Exception as e:  # a payload pysparkplug cannot decode fails the test
                out({"type": "error", "topic": msg.topic, "error": repr(e)})

    # Unique per test (the group is): two clients with one id knock each other off.
    client = mqtt.Client(client_id=f"spb-host-{args.group}-{args.node}", clean_session=True)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(args.host, args.port, keepalive=10)
    client.loop_start()

    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "rebirth":
            now = spb.get_current_timestamp()
            rebirth = spb.Metric(timestamp=now, name="Node Control/Rebirth", datatype=spb.DataType.BOOLEAN, value=True)
            ncmd = spb.NCmd(timestamp=now, metrics=(rebirth,))
            info = client.publish(f"spBv1.0/{args.group}/NCMD/{args.node}", ncmd.encode(include_dtypes=True), qos=0)
            info.wait_for_publish(5)
            out({"type": "sent", "what": "rebirth"})
        elif cmd.startswith("state ") and args.host_id:
            what = cmd.split(" ", 1)[1]
            now = spb.get_current_timestamp()
            if what == "online":
                last_online[0] = now
            ts = last_online[0] - 1000 if what == "stale" else now
            body = json.dumps({"online": what == "online", "timestamp": ts})
            info = client.publish(f"spBv1.0/STATE/{args.host_id}", body, qos=1, retain=True)
            info.wait_for_publish(5)
            out({"type": "sent", "what": cmd})
        elif cmd == "clear":
            if args.host_id:
                client.publish(f"spBv1.0/STATE/{args.host_id}", b"", qos=1, retain=True).wait_for_publish(5)
            out({"type": "sent", "what": "clear"})
        elif cmd == "quit":
            break
    client.loop_stop()
    client.disconnect()


if __name__ == "__main__":
    main()
