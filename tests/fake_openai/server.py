#!/usr/bin/env python3
"""A fake OpenAI-compatible server for the provider tests (Python standard library only).

Raw asyncio HTTP/1.1 with keep-alive, so the tests control every TCP write: SSE events are
split across writes and chunks, and each connection is recorded (requests served, whether the
client hung up mid-stream) for `GET /_stats`.

Usage: server.py [--tls CERT KEY]; prints "PORT <n>" on stdout once listening on 127.0.0.1.
The behaviour of /v1/chat/completions is picked by the request's "model":
  think   text with a <think> block, every event split over 3 chunks and 6 writes, usage, [DONE]
  tools   two interleaved tool calls, finish_reason tool_calls
  slow    response head and a role-only chunk at once, then nothing for 5 s
  endless a token every 20 ms for 10 s
  boom    500 with a JSON error body
  close   like think, then the server closes the connection 50 ms later (stale pool entry)
  stale   like think, then the next request on the connection is read and left unanswered
          (the connection is closed), as when a keep-alive timeout races a new request
"""

import argparse
import asyncio
import json
import socket
import ssl
import struct
import sys
import time

CONNS = []
LAST = {}


def sse(obj):
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def delta(**d):
    return {"id": "c1", "object": "chat.completion.chunk", "model": "fake",
            "choices": [{"index": 0, "delta": d, "finish_reason": None}]}


def finish(reason):
    return {"id": "c1", "object": "chat.completion.chunk", "model": "fake",
            "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}


def tool(index, id=None, name=None, args=""):
    call = {"index": index, "function": {"arguments": args}}
    if id:
        call["id"] = id
        call["type"] = "function"
        call["function"]["name"] = name
    return delta(tool_calls=[call])


USAGE = {"id": "c1", "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 7,
                                             "total_tokens": 19}}

THINK_EVENTS = [
    delta(role="assistant", content=""),
    delta(content="<thi"),
    delta(content="nk>I should greet.</th"),
    delta(content="ink>\n\nHello"),
    delta(content=", wor"),
    delta(content="ld! 你好"),
    finish("stop"),
    USAGE,
]

TOOL_EVENTS = [
    delta(role="assistant", content=None),
    tool(0, "call_w", "get_weather", ""),
    tool(1, "call_m", "play_music", '{"song":'),
    tool(0, args='{"city":'),
    tool(1, args='"Yesterday"}'),
    tool(0, args='"Paris"}'),
    finish("tool_calls"),
]


async def stop(task):
    """Cancels a task and waits for it, so its pending read is gone before the next one."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


class Conn:
    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.record = {"id": len(CONNS), "paths": [], "client_closed_mid_stream": False,
                       "closed": False}
        CONNS.append(self.record)
        self.drop_next = False

    async def write(self, data, pause=0.0):
        self.writer.write(data)
        await self.writer.drain()
        if pause:
            await asyncio.sleep(pause)

    async def head(self, status, headers):
        lines = [f"HTTP/1.1 {status}"] + [f"{k}: {v}" for k, v in headers]
        await self.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    async def chunk(self, data, split=False):
        frame = f"{len(data):x}\r\n".encode() + data + b"\r\n"
        if split:
            mid = len(frame) // 2
            await self.write(frame[:mid], 0.002)
            await self.write(frame[mid:], 0.002)
        else:
            await self.write(frame)

    async def end_chunks(self):
        await self.write(b"0\r\n\r\n")

    async def respond(self, status, body, content_type="application/json", extra=()):
        await self.head(status, [("Content-Type", content_type),
                                 ("Content-Length", str(len(body))), *extra])
        await self.write(body)

    async def watch_eof(self):
        """Waits for the client to hang up while a response is being streamed."""
        try:
            data = await self.reader.read(1)
        except (ConnectionError, OSError):
            data = b""
        if not data:
            self.record["client_closed_mid_stream"] = True

    async def stream(self, events, split, pace=0.0, done=True, terminator_delay=0.03):
        await self.head("200 OK", [("Content-Type", "text/event-stream"),
                                   ("Cache-Control", "no-cache"),
                                   ("Transfer-Encoding", "chunked")])
        watcher = asyncio.ensure_future(self.watch_eof())
        try:
            for ev in events:
                if self.record["client_closed_mid_stream"]:
                    return False
                data = sse(ev)
                if split:  # one SSE event over 3 HTTP chunks, each over 2 TCP writes
                    a, b = len(data) // 3, 2 * len(data) // 3
                    for part in (data[:a], data[a:b], data[b:]):
                        await self.chunk(part, split=True)
                else:
                    await self.chunk(data)
                if pace:
                    await asyncio.sleep(pace)
            if done:
                await self.chunk(sse("[DONE]"))
            await asyncio.sleep(terminator_delay)
            await self.end_chunks()
            return True
        except (ConnectionError, OSError):
            self.record["client_closed_mid_stream"] = True
            return False
        finally:
            await stop(watcher)

    async def chat(self, req):
        model = req.get("model")
        if model in ("think", "close", "stale"):
            ok = await self.stream(THINK_EVENTS, split=True)
            self.drop_next = model == "stale"
            if model == "close":
                await asyncio.sleep(0.05)
                return False
            return ok
        if model == "tools":
            return await self.stream(TOOL_EVENTS, split=False)
        if model == "slow":
            events = [delta(role="assistant", content="")] + [None] * 250
            return await self.stream_slow(events)
        if model == "endless":
            return await self.stream([delta(content=f"t{i} ") for i in range(500)],
                                     split=False, pace=0.02)
        if model == "boom":
            body = json.dumps({"error": {"message": "model exploded", "type": "server_error"}})
            await self.respond("500 Internal Server Error", body.encode())
            return True
        await self.respond("400 Bad Request", b'{"error":{"message":"unknown model"}}')
        return True

    async def stream_slow(self, events):
        # Role chunk at once, then silence (None entries are 20 ms pauses).
        await self.head("200 OK", [("Content-Type", "text/event-stream"),
                                   ("Transfer-Encoding", "chunked")])
        await self.chunk(sse(events[0]))
        watcher = asyncio.ensure_future(self.watch_eof())
        try:
            for _ in events[1:]:
                if self.record["client_closed_mid_stream"]:
                    return False
                await asyncio.sleep(0.02)
            await self.chunk(sse("[DONE]"))
            await self.end_chunks()
            return True
        finally:
            await stop(watcher)

    async def transcribe(self, headers, body):
        ctype = headers.get("content-type", "")
        boundary = ctype.split("boundary=", 1)[1].encode()
        fields, file = {}, None
        for part in body.split(b"--" + boundary)[1:]:
            if part.startswith(b"--"):
                break
            part_head, _, content = part[2:].partition(b"\r\n\r\n")
            content = content[:-2]  # the CRLF before the next boundary
            disp = part_head.decode()
            name = disp.split('name="', 1)[1].split('"', 1)[0]
            if 'filename="' in disp:
                file = {"name": name, "filename": disp.split('filename="', 1)[1].split('"')[0],
                        "content_type": disp.split("Content-Type: ", 1)[1].strip(),
                        "hex": content.hex()}
            else:
                fields[name] = content.decode()
        LAST["transcription"] = {"fields": fields, "file": file,
                                 "content_length": headers.get("content-length"),
                                 "authorization": headers.get("authorization")}
        await self.respond("200 OK", json.dumps({"text": "  turn on the lights  "}).encode())
        return True

    async def speech(self, req):
        LAST["speech"] = req
        n = len(req["input"]) * 100
        samples = [(i * 37 % 2000) - 1000 for i in range(n)]
        pcm = struct.pack(f"<{n}h", *samples)
        if req.get("response_format") == "wav":
            rate = 22050
            fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
            audio = (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE"
                     + b"fmt " + struct.pack("<I", 16) + fmt
                     + b"LIST" + struct.pack("<I", 4) + b"INFO"
                     + b"data" + struct.pack("<I", 0xFFFFFFFF) + pcm)
            ctype = "audio/wav"
        else:
            audio, ctype = pcm, "audio/pcm"
        await self.head("200 OK", [("Content-Type", ctype), ("Transfer-Encoding", "chunked")])
        for i in range(0, len(audio), 4096):
            await self.chunk(audio[i:i + 4096])
        await self.end_chunks()
        return True

    async def serve(self):
        try:
            while True:
                head = await self.reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                n = int(headers.get("content-length", "0"))
                body = await self.reader.readexactly(n) if n else b""
                path = target.split("?", 1)[0]
                if path == "/_stats":
                    stats = {"connections": [c for c in CONNS if c["paths"]], "last": LAST}
                    await self.respond("200 OK", json.dumps(stats).encode())
                    continue
                self.record["paths"].append(path)
                if self.drop_next:
                    break
                if method == "POST" and path == "/v1/chat/completions":
                    req = json.loads(body)
                    LAST["chat"] = {"body": req, "authorization": headers.get("authorization"),
                                    "host": headers.get("host"), "target": target}
                    keep = await self.chat(req)
                elif method == "POST" and path == "/v1/audio/transcriptions":
                    keep = await self.transcribe(headers, body)
                elif method == "POST" and path == "/v1/audio/speech":
                    keep = await self.speech(json.loads(body))
                else:
                    await self.respond("404 Not Found", b'{"error":"no route"}')
                    keep = True
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.record["closed"] = True
            self.writer.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    args = ap.parse_args()
    ctx = None
    if args.tls:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(*args.tls)

    async def on_conn(reader, writer):
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await Conn(reader, writer).serve()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=ctx)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
