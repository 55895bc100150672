"""The ``argosy`` command line.

``argosy serve [MODEL]`` loads a model and serves the OpenAI-compatible API. Each
subcommand registers itself with an ``_add_<name>`` function that sets ``func`` on its
parser; ``main`` dispatches to it and returns its exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
import time
from typing import Optional, Sequence

from .server.tool_parsers import TOOL_PARSERS

logger = logging.getLogger("argosy.server")

#: Exit code for bad input (unknown model, inconsistent flags), as argparse uses.
EXIT_USAGE = 2

#: After the engine dies, seconds the server keeps answering (``/health`` 503, requests
#: 503) before it exits with code 1.
ENGINE_DEAD_LINGER_S = 2.0


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    """Print ``argosy: error: <message>`` (one line) to stderr and return ``code``."""
    one_line = " ".join(str(message).split("\n")).strip()
    print(f"argosy: error: {one_line}", file=sys.stderr, flush=True)
    return code


#: aiohttp's access-log format: client address, request line, status, response bytes, seconds.
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tf'


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


# ------------------------------------------------------------------------- serve
def _add_serve(sub, engine_flags: bool = True) -> None:
    """Register ``serve``. Its engine flags come from :class:`EngineArgs`, which imports torch:
    without ``engine_flags`` (another subcommand runs) or without torch, ``serve`` is
    registered bare, so ``argosy download`` and ``argosy operator`` never import torch."""
    EngineArgs = None
    if engine_flags:
        try:
            from .config import EngineArgs
        except ImportError as e:  # no torch: the operator image
            _missing_runtime.append(str(e))
    p = sub.add_parser(
        "serve",
        help="serve a model over the OpenAI-compatible HTTP API",
        description="Load MODEL (a GGUF file, a Hugging Face model directory or hub id; default: the bundled "
                    "SmolLM2-135M-Instruct) and serve /v1/chat/completions, /v1/completions and friends.",
    )
    p.add_argument("model_tag", nargs="?", metavar="MODEL", default=None, help="model to serve (same as --model)")
    p.add_argument("--model", default=None, help="model to serve (GGUF file, HF directory or hub id)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 = any free port)")
    p.add_argument("--api-key", default=os.environ.get("ARGOSY_API_KEY") or os.environ.get("VLLM_API_KEY"),
                   help="require 'Authorization: Bearer <key>' on /v1/* (default: $ARGOSY_API_KEY or $VLLM_API_KEY)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let in-flight requests finish before aborting them (default 30)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"],
                   help="log level (default info)")
    p.add_argument("--enable-log-requests", action="store_true",
                   help="log each request as it arrives: id, prompt (cut to --max-log-len), sampling parameters "
                        "(default off, as vLLM)")
    p.add_argument("--disable-log-requests", action="store_true",
                   help="no per-request log lines (the default; accepted for vLLM manifests that pass it)")
    p.add_argument("--max-log-len", type=int, default=None, metavar="N",
                   help="with --enable-log-requests: at most N prompt characters and N prompt token ids per line "
                        "(default: all)")
    p.add_argument("--disable-uvicorn-access-log", "--disable-access-log", dest="disable_access_log",
                   action="store_true",
                   help="no access log line per HTTP request (logger argosy.access: client, request line, status, "
                        "bytes, seconds; vLLM's flag name is kept)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='let the model decide to call tools (tool_choice "auto", the default with tools); '
                        "needs --tool-call-parser")
    p.add_argument("--tool-call-parser", default=None, choices=list(TOOL_PARSERS),
                   help="how tool calls are found in the model's text for tool_choice auto: hermes "
                        "(<tool_call>{...}</tool_call>, Hermes 2 Pro / Qwen 2.5) or llama3_json (Llama 3.x JSON)")
    if EngineArgs is None:
        p.add_argument("engine_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(func=_cmd_serve_unavailable)
        return
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=_cmd_serve)


_missing_runtime: list[str] = []


def _looks_like_model(arg: str) -> bool:
    """True for what reads as a model argument (an existing path, a ``.gguf`` file, a hub
    id ``ORG/NAME``): ``--served-model-name a b MODEL`` takes MODEL as a name."""
    return os.path.exists(arg) or arg.endswith(".gguf") or re.fullmatch(r"[\w.-]+/[\w.-]+", arg) is not None


def _cmd_serve_unavailable(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    detail = f" ({_missing_runtime[-1]})" if _missing_runtime else ""
    return _fail(f"`argosy serve` needs the runtime extra: pip install 'argosy[runtime]'{detail}")


def _cmd_serve(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _setup_logging(ns.log_level)
    if ns.model_tag and ns.model and ns.model_tag != ns.model:
        return _fail(f"two different models given: {ns.model_tag!r} and --model {ns.model!r}")
    ns.model = ns.model or ns.model_tag
    names = ns.served_model_name or []
    if ns.model is None and any(_looks_like_model(n) for n in names[1:]):
        return _fail(f"--served-model-name took {' '.join(names)} and no MODEL is given: put MODEL before "
                     "--served-model-name (its names run to the next flag), or pass --model")
    if ns.shutdown_timeout < 0:
        return _fail("--shutdown-timeout must be non-negative")
    if ns.enable_log_requests and ns.disable_log_requests:
        return _fail("--enable-log-requests and --disable-log-requests contradict each other")
    if ns.max_log_len is not None and ns.max_log_len < 0:
        return _fail("--max-log-len must be non-negative")
    if ns.enable_auto_tool_choice and not ns.tool_call_parser:
        return _fail(f"--enable-auto-tool-choice needs --tool-call-parser ({' or '.join(TOOL_PARSERS)})")

    from .config import EngineArgs
    from .core.engine import LLMEngine
    from .loader import ModelLoadError

    from .core.async_llm import AsyncLLM

    args = EngineArgs.from_cli_args(ns)
    try:
        # built on the engine thread that will run its steps (see AsyncLLM: 1.6x faster on CPU)
        async_llm = AsyncLLM(lambda: LLMEngine(args))
    except (ModelLoadError, ValueError) as e:
        return _fail(str(e))
    except RuntimeError as e:  # e.g. a tensor-parallel worker failed to start
        return _fail(str(e), 1)
    try:
        return asyncio.run(_serve(async_llm, ns))
    finally:
        async_llm.shutdown()  # idempotent: no worker process outlives the server


async def _serve(async_llm, ns: argparse.Namespace) -> int:
    """Run the HTTP server until SIGTERM/SIGINT, then drain and exit (returns the exit code).

    Shutdown: new requests get 503 and /health turns 503; in-flight requests get up to
    ``--shutdown-timeout`` seconds; the rest fail when the engine stops. A second signal
    skips the wait.

    If the engine dies (its loop raised, or a tensor-parallel worker exited), in-flight
    requests get an error, /health turns 503, and the server exits with code 1 so that
    Kubernetes restarts the pod.
    """
    from aiohttp import web

    from .server.app import build_app, drain, num_inflight

    loop = asyncio.get_running_loop()
    engine = async_llm.engine
    app = build_app(async_llm, ns)
    access = {} if ns.disable_access_log else {"access_log": logging.getLogger("argosy.access"),
                                                  "access_log_format": ACCESS_LOG_FORMAT}
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=5.0,
                           **({"access_log": None} | access))
    await runner.setup()
    site = web.TCPSite(runner, ns.host, ns.port)
    try:
        await site.start()
    except OSError as e:
        await loop.run_in_executor(None, async_llm.shutdown)
        await runner.cleanup()
        return _fail(f"cannot listen on {ns.host}:{ns.port}: {e.strerror or e}", 1)
    port = ns.port
    server = getattr(site, "_server", None)
    if server is not None and server.sockets:
        port = server.sockets[0].getsockname()[1]
    logger.info("Argosy %s serving %s on http://%s:%d (API: /v1/chat/completions, /v1/completions)",
                _version(), engine.served_model_name, ns.host, port)

    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal(signame: str) -> None:
        if stop.is_set():
            logger.warning("%s again: aborting in-flight requests now", signame)
            force.set()
        else:
            logger.info("%s received: shutting down", signame)
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    dead = asyncio.Event()
    async_llm.dead_observers.append(lambda err: loop.call_soon_threadsafe(dead.set))
    if async_llm.error is not None:
        dead.set()
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(dead.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    if dead.is_set() and not stop.is_set():
        logger.error("engine died (%s); exiting with code 1 so that the pod is restarted", async_llm.error)
        t_dead = time.monotonic()
        await drain(app, 5.0, force)  # in-flight requests already got the error: let them answer
        # keep answering /health with 503 a moment, so probes and load balancers see it
        await asyncio.sleep(max(0.0, ENGINE_DEAD_LINGER_S - (time.monotonic() - t_dead)))
        await loop.run_in_executor(None, async_llm.shutdown)
        await runner.cleanup()
        return 1

    busy = num_inflight(app)
    if busy:
        logger.info("draining %d in-flight request(s) (up to %.0fs)", busy, ns.shutdown_timeout)
    if not await drain(app, ns.shutdown_timeout, force):
        logger.warning("aborting %d request(s) still in flight", num_inflight(app))
    await loop.run_in_executor(None, async_llm.shutdown)
    await runner.cleanup()
    logger.info("server stopped")
    return 0


def _version() -> str:
    from . import __version__

    return __version__


# -------------------------------------------------------------------------- main
#: Subcommands that must not import torch (they run in images without it).
LIGHT_COMMANDS = ("download", "operator", "router")


def build_parser(*, serve_flags: bool = True) -> argparse.ArgumentParser:
    """The ``argosy`` parser with every subcommand registered (``serve_flags=False`` leaves out
    ``serve``'s engine flags, which import torch)."""
    parser = argparse.ArgumentParser(prog="argosy", description="Argosy LLM inference runtime")
    parser.add_argument("--version", action="version", version=f"argosy {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_serve(sub, engine_flags=serve_flags)
    from . import download  # light: no torch import

    download.add_parser(sub)
    from .router import cli as router_cli  # light: no torch import

    router_cli.add_parser(sub)
    from ..operator import main as operator_main  # light: kopf loads only when it runs

    operator_main.add_parser(sub)
    return parser


def _command(argv: Sequence[str]) -> Optional[str]:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``argosy`` console script.

    Returns:
        The process exit code: 0 on success (including a graceful SIGTERM shutdown),
        2 when the model cannot be loaded or flags are inconsistent (one
        ``argosy: error: ...`` line on stderr).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(serve_flags=_command(argv) not in LIGHT_COMMANDS)
    ns = parser.parse_args(argv)
    return ns.func(ns, parser)


if __name__ == "__main__":
    sys.exit(main())
