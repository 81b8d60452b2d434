"""What one grpc.aio stream message costs the process that sends it.

The router's floor per request is set by the messages it exchanges with the
pods (a start written, events read) and the sends of its HTTP answer. This
measures the first kind alone: a bidirectional stream to a server in another
process, ``--messages`` sequential writes of ``--bytes`` bytes, then as many
write + read round trips; the client's own CPU (user + system) per message
and the wall time. JSON with ``--json``.

    python bench/grpc_message_cost.py --json bench/results/grpc_message_cost.json
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from splitserve import event_loop  # noqa: E402
from splitserve.local.launcher import free_port  # noqa: E402

_SERVER = r'''
import asyncio, sys, grpc
async def main(port):
    server = grpc.aio.server()
    async def sink(requests, context):
        async for message in requests:
            if message[:1] == b"e":
                yield b"ok"
    handler = grpc.method_handlers_generic_handler(
        "bench.Sink", {"Stream": grpc.stream_stream_rpc_method_handler(sink)})
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("up", flush=True)
    await server.wait_for_termination()
asyncio.run(main(int(sys.argv[1])))
'''


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _measure(port: int, messages: int, size: int) -> dict[str, float]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    call = channel.stream_stream("/bench.Sink/Stream")()
    plain, echoed = b"x" * size, b"e" + b"x" * (size - 1)
    for _ in range(200):  # warm-up
        await call.write(plain)
    out: dict[str, float] = {}
    for label, payload, read in (("write", plain, False), ("write_read", echoed, True)):
        cpu0, wall0 = _cpu(), time.perf_counter()
        for _ in range(messages):
            await call.write(payload)
            if read:
                await call.read()
        out[f"{label}_cpu_us"] = round((_cpu() - cpu0) / messages * 1e6, 1)
        out[f"{label}_wall_us"] = round((time.perf_counter() - wall0) / messages * 1e6, 1)
    call.cancel()
    await channel.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--bytes", type=int, default=1200, help="one message (a 256-token start is ~1.1 kB)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.messages < 1 or args.bytes < 2:
        parser.error("--messages must be >= 1 and --bytes >= 2")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", _SERVER, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        if server.stdout is None or server.stdout.readline().strip() != "up":
            raise SystemExit("the sink server did not start")
        result = event_loop.run(_measure(port, args.messages, args.bytes))
    finally:
        server.kill()
        server.wait()
    report = {"benchmark": "grpc_message_cost", "grpcio": grpc.__version__, "loop": event_loop.loop_kind(),
              "machine": {"platform": platform.platform(), "processor": platform.processor()},
              "messages": args.messages, "bytes": args.bytes, **result}
    print(f"one stream write: {result['write_cpu_us']} us of the sender's CPU ({result['write_wall_us']} us wall); "
          f"a write and a read: {result['write_read_cpu_us']} us ({result['write_read_wall_us']} us wall)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
