"""``argosy operator``: run the InferenceService operator (the Helm chart's container command).

This module is imported by the ``argosy`` command line to register the subcommand, so it
imports nothing heavy at module level: kopf, the ``kubernetes`` client and the handlers
load only when the operator runs. Operator settings come from ``ARGOSY_*`` environment
variables (:meth:`~argosy.operator.settings.OperatorSettings.from_env`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

#: kopf's liveness endpoint the Helm chart probes.
DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"
EXIT_USAGE = 2


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``operator`` on an ``argparse`` subparsers object; sets ``func`` to :func:`run`."""
    p = subparsers.add_parser(
        "operator",
        help="run the Kubernetes operator for InferenceService resources",
        description="Reconcile InferenceService resources (serving.argosy.dev/v1alpha1) into a model cache, a "
                    "prefetch Job, a Deployment of `argosy serve`, a Service and an autoscaler. Settings come "
                    "from ARGOSY_* environment variables; credentials from the in-cluster service account or "
                    "the kubeconfig.",
    )
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", dest="namespaces", metavar="NS", default=None,
                       help="serve only this namespace (repeatable; kopf glob patterns such as 'team-*' work)")
    scope.add_argument("-A", "--all-namespaces", action="store_true",
                       help="serve every namespace (the default without --namespace)")
    peering = p.add_mutually_exclusive_group()
    peering.add_argument("--standalone", action="store_true",
                         help="run without kopf peering (a single replica; no peering CRDs needed)")
    peering.add_argument("--peering", metavar="NAME", default=None,
                         help="coordinate with other replicas through the kopf peering object NAME "
                              "(needs kopf's peering CRDs); default: kopf's 'default' peering when its CRDs "
                              "exist, standalone otherwise")
    p.add_argument("--liveness", default=DEFAULT_LIVENESS, metavar="URL",
                   help=f"kopf's liveness endpoint (default {DEFAULT_LIVENESS}; '' disables it)")
    p.add_argument("--log-format", choices=["plain", "full", "json"], default="full",
                   help="log line format (default full)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=run)
    return p


def _fail(message: str) -> int:
    print(f"argosy: error: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def run(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> int:
    """Run the operator until SIGTERM or SIGINT.

    Returns:
        0 after a clean stop; 2 when the ``operator`` extra is not installed or an
        ``ARGOSY_*`` variable is invalid (one ``argosy: error: ...`` line on stderr).
    """
    try:
        import kopf

        from .handlers import Context, build_registry, kopf_settings
        from .settings import OperatorSettings
    except ImportError as e:
        return _fail(f"`argosy operator` needs the operator extra (pip install 'argosy[operator]'): {e}")
    try:
        settings = OperatorSettings.from_env()
        settings.service_monitor_label_map()  # a malformed label list fails here, not in every pass
        settings.runtime_image_pull_secret_names()
    except ValueError as e:
        return _fail(str(e))

    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat[args.log_format.upper()])
    ctx = Context(settings, namespaces=args.namespaces)
    kopf.run(
        registry=build_registry(ctx),
        settings=kopf_settings(ctx),
        standalone=True if args.standalone else None,
        peering_name=args.peering,
        liveness_endpoint=args.liveness or None,
        clusterwide=not args.namespaces,
        namespaces=args.namespaces or (),
    )
    return 0
