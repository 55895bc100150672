"""``argosy router``: command-line flags and the process around :func:`.app.build_router_app`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Optional

from .policy import DEFAULT_LOAD_COST_TOKENS, POLICIES

logger = logging.getLogger("argosy.router")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``router`` on an ``argparse`` subparsers object; sets ``func`` to :func:`run`."""
    p = subparsers.add_parser(
        "router",
        help="route OpenAI API requests over argosy serve replicas (prefix-cache aware)",
        description="An OpenAI-compatible proxy in front of `argosy serve` replicas: prefix-cache-aware routing "
                    "with the engines' own block hashes, requests held while no replica is ready.",
    )
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--upstream", action="append", default=[], metavar="URL",
                   help="an `argosy serve` base URL (repeatable), e.g. http://10.0.0.5:8000")
    p.add_argument("--upstream-service", default=None, metavar="NAME",
                   help="route to the ready endpoints of this Service's EndpointSlices (watched; needs get/list/watch "
                        "on endpointslices)")
    p.add_argument("--namespace", default=None,
                   help="namespace of --upstream-service (default: the pod's own namespace)")
    p.add_argument("--upstream-port-name", default="http", help="EndpointSlice port to use (default: http)")
    p.add_argument("--kubeconfig", default=None,
                   help="kubeconfig for --upstream-service (default: in-cluster config, else $KUBECONFIG)")
    p.add_argument("--model", default=None,
                   help="the served model, for its tokenizer and chat template (resolved as `argosy serve MODEL`; "
                        "default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--revision", default=None, help="hub revision of --model (as `argosy serve --revision`)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory, when the engines use --tokenizer")
    p.add_argument("--routing", choices=POLICIES, default="prefix", help="routing policy (default: prefix)")
    p.add_argument("--block-size", type=int, default=16, help="the engines' --block-size (tokens per KV block)")
    p.add_argument("--prefix-caching-hash-algo", default="sha256", choices=["sha256", "sha256_cbor"],
                   help="the engines' --prefix-caching-hash-algo")
    p.add_argument("--load-cost-tokens", type=float, default=DEFAULT_LOAD_COST_TOKENS,
                   help="prompt tokens one queued or in-flight request is worth when weighing a cached prefix "
                        "against load (prefix routing)")
    p.add_argument("--max-pending", type=int, default=1024,
                   help="requests held while no upstream is ready; more get 503")
    p.add_argument("--pending-timeout", type=float, default=300.0,
                   help="seconds a request is held waiting for a ready upstream before a 503")
    p.add_argument("--max-inflight-per-upstream", type=int, default=0,
                   help="requests in flight per upstream before new ones wait, served fairly between tenants "
                        "(0: no limit)")
    p.add_argument("--fallback", default=None, metavar="URL",
                   help="base URL of another service (an InferenceService's router or server) for requests no "
                        "upstream can take: none ready, all busy, or all failed")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between upstream polls")
    p.add_argument("--service", default="default", help="the `service` label of the router's metrics")
    p.add_argument("--tenants", default=None, metavar="FILE",
                   help="JSON file of API keys -> tenants and per-tenant limits (requests and tokens per minute, "
                        "concurrent requests); every request then needs a listed key")
    p.add_argument("--upstream-api-key", default=os.environ.get("ARGOSY_UPSTREAM_API_KEY"),
                   help="bearer token sent to the engines (their --api-key; default $ARGOSY_UPSTREAM_API_KEY)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> int:
    """Run the router until SIGTERM / SIGINT.

    Returns:
        0 after a clean stop; 2 for bad flags or a model whose tokenizer cannot be loaded
        (one ``argosy: error: ...`` line on stderr).
    """
    from ..loader.errors import ModelLoadError
    from .app import RouterConfig, build_router_app
    from .discovery import in_cluster_namespace

    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if args.block_size < 1 or args.max_pending < 0 or args.pending_timeout < 0 or args.poll_interval <= 0:
        print("argosy: error: --block-size and --poll-interval must be positive, --max-pending and "
              "--pending-timeout not negative", file=sys.stderr, flush=True)
        return 2
    tokenizer = None
    if args.routing == "prefix":
        from ..loader.tokenizer import load_model_tokenizer

        try:
            tokenizer = load_model_tokenizer(args.model, args.tokenizer, args.revision)
        except ModelLoadError as e:
            print(f"argosy: error: {e}", file=sys.stderr, flush=True)
            return 2
    cfg = RouterConfig(upstreams=args.upstream, routing=args.routing, block_size=args.block_size,
                       hash_algo=args.prefix_caching_hash_algo, max_pending=args.max_pending,
                       pending_timeout=args.pending_timeout, poll_interval=args.poll_interval,
                       load_cost_tokens=args.load_cost_tokens, service=args.service,
                       upstream_service=args.upstream_service, upstream_port_name=args.upstream_port_name,
                       namespace=args.namespace or (in_cluster_namespace() if args.upstream_service else None),
                       kubeconfig=args.kubeconfig, tenants_file=args.tenants,
                       upstream_api_key=args.upstream_api_key,
                       max_inflight_per_upstream=args.max_inflight_per_upstream, fallback=args.fallback)
    try:
        app = build_router_app(cfg, tokenizer)
    except ValueError as e:
        print(f"argosy: error: {e}", file=sys.stderr, flush=True)
        return 2
    return asyncio.run(_serve(app, args.host, args.port))


async def _serve(app, host: str, port: int) -> int:
    from aiohttp import web

    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    for addr in runner.addresses:  # the bound port (with --port 0, the one the OS picked)
        if isinstance(addr, tuple):
            port = addr[1]
            break
    logger.info("argosy router listening on http://%s:%d", host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("stopping")
    await runner.cleanup()
    return 0
