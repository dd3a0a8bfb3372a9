"""`moemesh complete`: one request to a running mesh through the gRPC SDK, streamed to the terminal."""

from __future__ import annotations

import argparse
import os
import sys
import time


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("complete", help="send one prompt to a running mesh (gRPC) and stream the answer",
                       description="Send one prompt to a running mesh's gateway and stream the answer.")
    p.add_argument("prompt")
    p.add_argument("--target", default="127.0.0.1:50051", help="the gateway's gRPC address")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="keep trying this long while the mesh is starting (no gateway or no workers yet)")
    g = p.add_argument_group("security")
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help="the gateway's API key (default: $MOEMESH_API_KEY; the variable keeps it out of the "
                        "process list)")
    for name, what in (("ca", "CA bundle that signs the gateway's certificate (any --tls-* makes the channel TLS)"),
                       ("cert", "this client's certificate (mutual TLS)"), ("key", "its private key")):
        var = f"MOEMESH_TLS_{name.upper()}"
        g.add_argument(f"--tls-{name}", default=os.environ.get(var) or None, metavar="FILE",
                       help=f"{what}, PEM (default: ${var})")
    g.add_argument("--tls-server-name", default=os.environ.get("MOEMESH_TLS_SERVER_NAME") or None, metavar="NAME",
                   help="name to verify in the gateway's certificate (default: the target's host)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moemesh.sdk import MeshClient, MeshError, UnavailableError

    deadline = time.monotonic() + args.wait
    kw = {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed}
    try:
        client = MeshClient(args.target, timeout_s=120, api_key=args.api_key, tls_ca=args.tls_ca,
                            tls_cert=args.tls_cert, tls_key=args.tls_key, tls_server_name=args.tls_server_name)
    except ValueError as e:  # a certificate file missing, or a cert without its key
        print(f"moemesh: error: {e}", file=sys.stderr)
        return 2
    with client:
        while True:
            try:
                if args.chat:
                    chunks = client.chat_stream([{"role": "user", "content": args.prompt}], **kw)
                else:
                    chunks = client.stream(prompt=args.prompt, **kw)
                last = None
                for chunk in chunks:
                    if last is None and not args.chat:
                        print(args.prompt, end="")  # only once the mesh answered: a retry prints nothing twice
                    print(chunk.text, end="", flush=True)
                    last = chunk
                print(f"\n[{last.finish_reason if last else '?'}]", file=sys.stderr)
                return 0
            except UnavailableError as e:
                if time.monotonic() >= deadline:
                    print(f"moemesh: error: {e}", file=sys.stderr)
                    return 1
                time.sleep(1.0)
            except MeshError as e:  # a refused key, a bad parameter: one line, no traceback
                print(f"moemesh: error: {e}", file=sys.stderr)
                return 1
