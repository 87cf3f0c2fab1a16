#!/usr/bin/env python3
"""Resident size and TTS CPU per synthesis of the server across long local-TTS turns, for each
`inference.ort_memory` setting (tuning.md, "ONNX Runtime memory").

For each setting and voice a fresh server starts; one device sends `listen detect` text turns of
100-200 characters (the offline responder echoes them, so each turn is 2-4 synthesis jobs of
different lengths) and reads each answer to its `tts stop`. After every turn the script reads the
server's VmRSS (/proc/<pid>/status) and the CPU time of its TTS worker threads
(/proc/<pid>/task/*/stat, threads named tts<i>).

    .venv/bin/python scripts/measure-ort-memory.py [TURNS] [SETTING...]
    BIN=target/debug VOICES=piper,kokoro .venv/bin/python scripts/measure-ort-memory.py 12

Needs the websockets package (in .venv) and the local models (models/).
"""

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request

import websockets

BIN = os.environ.get("BIN", "target/debug")
WS_PORT, HTTP_PORT = 28100, 28103
TICK = os.sysconf("SC_CLK_TCK")
HELLO = {
    "type": "hello",
    "version": 1,
    "features": {"mcp": False},
    "transport": "websocket",
    "audio_params": {"format": "opus", "sample_rate": 16000, "channels": 1, "frame_duration": 60},
}
EN = [
    "the quick brown fox jumps over the lazy dog while the old cat sleeps on the warm mat by the door",
    "please remind me tomorrow morning at seven to water the plants in the garden and to call my "
    "sister about the weekend trip to the mountains",
    "999999999999999 999999999999999 999999999999999 999999999999999 999999999999999 999999999999999",
    "what a wonderful afternoon it has been with the sun over the hills and children laughing in "
    "the park near the river where the boats drift slowly past the old mill and the bridge",
]
ZH = [
    "今天北京天气晴朗最高气温二十五度下午三点以后可能有小雨出门记得带伞晚上风比较大注意保暖",
    "请帮我明天早上七点提醒我给花园里的植物浇水然后给姐姐打电话商量周末去山里旅行的事情还要订好车票和酒店",
    "九九九九九九九九九九九九九九九九九九九九九九九九九九九九九九九九九九九九九九九九",
    "这是一个美好的下午阳光照在山上孩子们在河边的公园里笑着小船慢慢地漂过老磨坊和古桥",
]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def tts_cpu_s(pid):
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        if name.startswith("tts"):
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])
    return total / TICK


def start(setting, voice):
    language = "en" if voice == "piper" else "zh"
    args = [
        f"{BIN}/xiaozhi-tpc", "serve",
        "--set", "server.ip=127.0.0.1",
        "--set", f"server.port={WS_PORT}",
        "--set", f"server.http_port={HTTP_PORT}",
        "--set", f'language="{language}"',
        "--set", "log.level=\"warn\"",
        "--set", f'inference.ort_memory="{setting}"',
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(1200):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{HTTP_PORT}/readyz", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}) for {setting}")
        time.sleep(0.1)
    raise SystemExit("server did not start")


async def turns(pid, texts, n):
    headers = {"Device-Id": "aa:bb:cc:00:00:01", "Client-Id": "ort-memory", "Protocol-Version": "1"}
    rows = []
    async with websockets.connect(
        f"ws://127.0.0.1:{WS_PORT}/xiaozhi/v1/", additional_headers=headers, max_size=None
    ) as ws:
        await ws.send(json.dumps(HELLO))
        await ws.recv()
        for i in range(n):
            cpu0 = tts_cpu_s(pid)
            text = texts[i % len(texts)]
            await ws.send(json.dumps({"type": "listen", "state": "detect", "text": text}))
            frames = 0
            while True:
                msg = await asyncio.wait_for(ws.recv(), timeout=120)
                if isinstance(msg, bytes):
                    frames += 1
                    continue
                v = json.loads(msg)
                if v.get("type") == "tts" and v.get("state") == "stop":
                    break
            await asyncio.sleep(0.3)
            rows.append((rss_kib(pid), tts_cpu_s(pid) - cpu0, frames))
    return rows


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    settings = sys.argv[2:] or ["arena", "no_pattern", "arena_shrink", "no_arena"]
    voices = os.environ.get("VOICES", "piper,kokoro").split(",")
    for voice in voices:
        texts = EN if voice == "piper" else ZH
        for setting in settings:
            proc = start(setting, voice)
            try:
                time.sleep(1)
                base = rss_kib(proc.pid)
                rows = asyncio.run(turns(proc.pid, texts, n))
            finally:
                proc.terminate()
                proc.wait()
            first = rows[0][0]
            peak = max(r[0] for r in rows)
            last = rows[-1][0]
            cpu = [r[1] for r in rows]
            with open("/proc/loadavg") as f:
                load = " ".join(f.read().split()[:3])
            print(
                f"{voice:6} {setting:12} start {base / 1024:6.0f} MB  after turn 1 {first / 1024:6.0f}"
                f"  peak {peak / 1024:6.0f}  after {n} {last / 1024:6.0f}  (+{(last - first) / 1024:.0f} MB"
                f" over turn 1)  TTS CPU/turn {sum(cpu) / len(cpu):.2f} s  load {load}",
                flush=True,
            )
            print("   rss MB per turn:", " ".join(f"{r[0] / 1024:.0f}" for r in rows), flush=True)
            print("   tts cpu s per turn:", " ".join(f"{r[1]:.2f}" for r in rows), flush=True)


if __name__ == "__main__":
    main()
