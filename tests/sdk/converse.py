"""Drive a xiaozhi-tpc server with the third-party PyPI client `xiaozhi-sdk`, used as a library.

Usage: converse.py URL WAV_16K_MONO OUT_REPLY_WAV [--mode auto|realtime|manual] [--timeout S]

Streams the WAV (16 kHz mono s16) as 60 ms frames in real time, then silence, waits for the
server's `tts stop`, writes the reply audio the SDK decoded to OUT_REPLY_WAV (16 kHz mono),
and prints one JSON line: {"events": [...], "stt": ..., "reply_frames": N, "reply_seconds": S}.
"""

import argparse
import asyncio
import json
import sys
import time
import wave

from xiaozhi_sdk import XiaoZhiWebsocket
from xiaozhi_sdk.utils import read_audio_file


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("wav")
    ap.add_argument("out")
    ap.add_argument("--mode", default="auto")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--mac", default="00:11:22:33:44:55")
    args = ap.parse_args()

    events = []
    done = asyncio.Event()

    async def on_message(message: dict) -> None:
        events.append({"t": round(time.monotonic(), 3), **message})
        if message.get("type") == "tts" and message.get("state") == "stop":
            done.set()

    client = XiaoZhiWebsocket(on_message, url=args.url, audio_sample_rate=16000, audio_frame_duration=60)
    client.mode = args.mode
    await client.init_connection(args.mac)
    start = time.monotonic()
    frames = list(read_audio_file(args.wav, 16000, 60))
    for i, pcm in enumerate(frames):
        await client.send_audio(pcm.ljust(1920, b"\0"))
        delay = start + (i + 1) * 0.06 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    # Silence until the server has answered (auto/realtime: server VAD ends the utterance).
    deadline = time.monotonic() + args.timeout
    while not done.is_set() and time.monotonic() < deadline:
        if not any(e.get("type") in ("stt", "tts") for e in events):
            await client.send_silence_audio(0.06)
        await asyncio.sleep(0.06)
    reply = list(client.output_audio_queue)
    await client.close()

    samples = b"".join(bytes(memoryview(a.astype("<i2"))) for a in reply)
    with wave.open(args.out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(samples)
    stt = next((e.get("text") for e in events if e.get("type") == "stt"), None)
    print(json.dumps({
        "events": events,
        "stt": stt,
        "reply_frames": len(reply),
        "reply_seconds": len(samples) / 2 / 16000,
        "completed": done.is_set(),
    }, ensure_ascii=False))
    return 0 if done.is_set() else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
