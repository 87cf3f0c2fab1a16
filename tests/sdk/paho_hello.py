"""Talk to a xiaozhi-tpc server's MQTT port with a standard MQTT client (PyPI `paho-mqtt`),
using the credentials the server's OTA endpoint hands out.

Usage: paho_hello.py OTA_URL MAC [--password-suffix X] [--timeout S]

Asks OTA for the `mqtt` section, connects with paho (MQTT 3.1.1, clean session), subscribes to
`subscribe_topic` as a standard client would, publishes a hello (`transport: "udp"`, version 3),
`listen start`/`stop`, a typed `listen detect` question and finally `goodbye`, and prints one
JSON line: {"connack": "Success" or the refusal, "hello": {...}, "types": [...], "topics": [...]}. With
`--password-suffix` the password is altered, to see the CONNACK refusal.
"""

import argparse
import json
import queue
import sys
import urllib.request

import paho.mqtt.client as mqtt


def ota_mqtt(url: str, mac: str) -> dict:
    body = json.dumps({"version": 2, "board": {"type": "paho-test"}}).encode()
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Device-Id": mac,
        "Client-Id": "0f0e0d0c-0000-4000-8000-000000000001",
        "Content-Type": "application/json",
    })
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)["mqtt"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ota_url")
    ap.add_argument("mac")
    ap.add_argument("--password-suffix", default="")
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()

    creds = ota_mqtt(args.ota_url, args.mac)
    host, port = creds["endpoint"].rsplit(":", 1)
    inbox: "queue.Queue" = queue.Queue()
    connack: "queue.Queue" = queue.Queue()

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=creds["client_id"],
        protocol=mqtt.MQTTv311,
        clean_session=True,
    )
    client.username_pw_set(creds["username"], creds["password"] + args.password_suffix)
    client.on_connect = lambda c, u, flags, rc, props: connack.put(rc)
    client.on_message = lambda c, u, msg: inbox.put((msg.topic, json.loads(msg.payload)))
    client.connect(host, int(port), keepalive=int(creds.get("keepalive") or 60))
    client.loop_start()
    rc = connack.get(timeout=10)
    summary = {"connack": rc.getName(), "types": [], "topics": []}
    if rc.is_failure:
        client.loop_stop()
        print(json.dumps(summary))
        return 0

    def send(msg: dict) -> None:
        client.publish(creds["publish_topic"], json.dumps(msg), qos=0)

    def wait(kind: str, state: str = "") -> dict:
        while True:
            topic, msg = inbox.get(timeout=args.timeout)
            summary["topics"].append(topic)
            label = msg.get("type", "?") + ("." + msg["state"] if "state" in msg else "")
            summary["types"].append(label)
            if msg.get("type") == kind and (not state or msg.get("state") == state):
                return msg

    client.subscribe(creds["subscribe_topic"], qos=0)
    send({"type": "hello", "version": 3, "transport": "udp", "features": {"mcp": False},
          "audio_params": {"format": "opus", "sample_rate": 16000, "channels": 1,
                           "frame_duration": 60}})
    summary["hello"] = wait("hello")
    session = summary["hello"]["session_id"]
    send({"session_id": session, "type": "listen", "state": "start", "mode": "manual"})
    send({"session_id": session, "type": "listen", "state": "stop"})
    send({"session_id": session, "type": "listen", "state": "detect",
          "text": "What time is it?"})
    wait("tts", "stop")
    send({"session_id": session, "type": "goodbye"})
    summary["goodbye"] = wait("goodbye")
    client.disconnect()
    client.loop_stop()
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
