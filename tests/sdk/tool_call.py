"""Drive a xiaozhi-tpc server's device tools with the third-party PyPI client `xiaozhi-sdk`.

Usage: tool_call.py URL [--timeout S] [--mac MAC] TEXT [TEXT ...]

Registers two MCP tools the way an application using the SDK would (a speaker volume setter and
a device status reader, state kept here), connects, and sends each TEXT as a text turn
(`listen detect`), waiting for the server's `tts stop` after each. Prints one JSON line:
{"calls": [[tool, arguments], ...], "volume": N, "turns": [{"sentences": [...], "stt": ...}],
 "completed": bool}.
"""

import argparse
import asyncio
import json
import sys

from xiaozhi_sdk import XiaoZhiWebsocket


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("texts", nargs="+")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--mac", default="00:11:22:33:44:66")
    args = ap.parse_args()

    state = {"volume": 30}
    calls = []

    def set_volume(arguments: dict):
        calls.append(["self.audio_speaker.set_volume", arguments])
        state["volume"] = int(arguments["volume"])
        return {"success": True, "volume": state["volume"]}, False

    def device_status(arguments: dict):
        calls.append(["self.get_device_status", arguments])
        return {"audio_speaker": {"volume": state["volume"]}}, False

    turn_events = []
    done = asyncio.Event()

    async def on_message(message: dict) -> None:
        turn_events.append(message)
        if message.get("type") == "tts" and message.get("state") == "stop":
            done.set()

    client = XiaoZhiWebsocket(on_message, url=args.url, audio_sample_rate=16000, audio_frame_duration=60)
    client.mode = "auto"
    await client.set_mcp_tool([
        {
            "name": "self.get_device_status",
            "description": "Current device status: speaker volume and more.",
            "inputSchema": {"type": "object", "properties": {}},
            "tool_func": device_status,
            "is_async": False,
        },
        {
            "name": "self.audio_speaker.set_volume",
            "description": "Set the volume of the audio speaker (0-100).",
            "inputSchema": {
                "type": "object",
                "properties": {"volume": {"type": "integer", "minimum": 0, "maximum": 100}},
                "required": ["volume"],
            },
            "tool_func": set_volume,
            "is_async": False,
        },
    ])
    await client.init_connection(args.mac)
    # The server reads the tool list right after hello; give the exchange time to finish.
    await asyncio.sleep(1.0)
    turns = []
    completed = True
    for text in args.texts:
        turn_events.clear()
        done.clear()
        await client.send_text(text)
        try:
            await asyncio.wait_for(done.wait(), args.timeout)
        except asyncio.TimeoutError:
            completed = False
        turns.append({
            "stt": next((e.get("text") for e in turn_events if e.get("type") == "stt"), None),
            "sentences": [e.get("text") for e in turn_events
                          if e.get("type") == "tts" and e.get("state") == "sentence_start"],
        })
    await client.close()
    print(json.dumps({"calls": calls, "volume": state["volume"], "turns": turns, "completed": completed},
                     ensure_ascii=False))
    return 0 if completed else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
