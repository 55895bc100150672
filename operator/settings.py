"""Operator-wide settings: what is the same for every InferenceService a deployment manages."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

DEFAULT_RUNTIME_IMAGE = "ghcr.io/argosy-dev/argosy-runtime:0.1.0"


@dataclass(frozen=True)
class OperatorSettings:
    """Defaults and cluster facts the renderers need (times in seconds).

    Every field can be set from the environment as ``ARGOSY_<FIELD NAME IN UPPER CASE>``
    (see :meth:`from_env`); the Helm chart sets them on the operator's Deployment.
    """

    #: Runtime image when ``spec.runtime.image`` is not set.
    runtime_image: str = DEFAULT_RUNTIME_IMAGE
    #: imagePullPolicy of runtime containers (None: the Kubernetes default for the tag).
    image_pull_policy: Optional[str] = None
    #: Prometheus the KEDA scaler queries when ``spec.scaling.prometheus.serverAddress`` is not set
    #: (the Prometheus Operator's ``prometheus-operated`` Service in namespace ``monitoring``).
    prometheus_server_address: str = "http://prometheus-operated.monitoring.svc:9090"
    #: Labels that the scrape adds to every series and that, together, pick one
    #: InferenceService's pods: a ServiceMonitor adds ``namespace`` and ``service``.
    prometheus_namespace_label: str = "namespace"
    prometheus_service_label: str = "service"
    #: Render a ServiceMonitor per InferenceService (needs the Prometheus Operator's CRDs).
    service_monitor: bool = True
    #: Labels those ServiceMonitors carry, ``k=v`` pairs separated by commas: the labels your
    #: Prometheus selects ServiceMonitors by (kube-prometheus-stack: ``release=<its release>``).
    service_monitor_labels: str = ""

    def service_monitor_label_map(self) -> dict[str, str]:
        """:attr:`service_monitor_labels` as a dict.

        Raises:
            ValueError: an entry without ``=`` or with an empty key.
        """
        out = {}
        for part in filter(None, (p.strip() for p in self.service_monitor_labels.split(","))):
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"ARGOSY_SERVICE_MONITOR_LABELS: {part!r} is not key=value")
            out[key.strip()] = value.strip()
        return out
    #: Secrets the runtime, prefetch and router pods pull their images with (their
    #: ``imagePullSecrets``), names separated by commas; each must exist in the namespace of
    #: every InferenceService (a private ``runtimeImage`` or ``spec.runtime.image``).
    runtime_image_pull_secrets: str = ""

    def runtime_image_pull_secret_names(self) -> list[str]:
        """:attr:`runtime_image_pull_secrets` as a list of Secret names.

        Raises:
            ValueError: a name that is not a DNS-1123 subdomain (what a Secret name must be).
        """
        names = [n.strip() for n in self.runtime_image_pull_secrets.split(",") if n.strip()]
        for n in names:
            if len(n) > 253 or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", n):
                raise ValueError(f"ARGOSY_RUNTIME_IMAGE_PULL_SECRETS: {n!r} is not a Secret name")
        return names
    #: Pod metric names under which Prometheus Adapter serves the runtime's gauges to an
    #: HPA (custom.metrics.k8s.io names cannot contain the colon of the Prometheus names).
    hpa_waiting_metric: str = "vllm_num_requests_waiting"
    hpa_kv_cache_metric: str = "vllm_kv_cache_usage_perc"
    #: KEDA pollingInterval.
    keda_polling_interval: int = 15
    #: Kubernetes cluster DNS domain, for ``status.url``.
    cluster_domain: str = "cluster.local"
    #: Longest model load before the startup probe gives up and the pod restarts.
    startup_timeout: int = 1800
    #: preStop sleep so endpoints stop sending traffic before the server gets SIGTERM.
    pre_stop_sleep: int = 10
    #: Extra margin of terminationGracePeriodSeconds over preStop + shutdown timeout.
    termination_margin: int = 15
    #: uid/gid of runtime containers (the runtime image's non-root user); also the fsGroup.
    run_as_user: int = 1000
    #: Prefetch Job retries before it is marked failed.
    prefetch_backoff_limit: int = 3
    #: CPU and memory the prefetch Job requests.
    prefetch_cpu: str = "500m"
    prefetch_memory: str = "2Gi"
    #: Seconds between two passes of the operator's resync loop, which reconciles every
    #: InferenceService again and so refreshes its status from the children (Deployment,
    #: Job, autoscaler) and repairs drift.
    resync_interval: float = 15.0
    #: First delay in seconds before retrying after an API error or a 409 conflict; it doubles
    #: on each retry up to ``retry_max_delay``.
    retry_delay: float = 2.0
    retry_max_delay: float = 60.0
    #: Builtin autoscaler: most replicas added / removed by one decision (once per resync).
    autoscale_up_step: int = 4
    autoscale_down_step: int = 1
    #: HTTPS port of the validating admission webhook (0: not served).
    webhook_port: int = 0
    #: Folder holding the webhook's serving certificate (tls.crt, tls.key): a mounted TLS
    #: Secret (cert-manager), or where the operator writes its own (``webhook_cert_secret``).
    webhook_cert_dir: str = "/etc/argosy/webhook-tls"
    #: When set, the operator issues and rotates the webhook certificate itself, kept in this
    #: Secret of ``webhook_namespace`` (see :mod:`argosy.operator.certs`); empty: files only.
    webhook_cert_secret: str = ""
    #: The operator's namespace and the webhook's Service (the certificate's DNS names).
    webhook_namespace: str = ""
    webhook_service: str = ""
    #: The ValidatingWebhookConfiguration whose caBundle the operator keeps in sync.
    webhook_configuration: str = ""
    #: Validity of the certificates it issues, and how long before expiry they are replaced (days).
    webhook_cert_validity_days: int = 365
    webhook_cert_renew_days: int = 30
    #: Seconds between checks of the certificate files (reload) and of the Secret (rotation).
    webhook_cert_reload_interval: float = 30.0
    webhook_cert_check_interval: float = 3600.0

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "OperatorSettings":
        """Settings from ``ARGOSY_*`` variables, defaults for the rest.

        Raises:
            ValueError: a variable for a numeric or boolean field has another value.
        """
        env = os.environ if environ is None else environ
        kw = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"ARGOSY_{f.name.upper()}")
            if raw is None:
                continue
            if isinstance(f.default, bool):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(f"ARGOSY_{f.name.upper()}={raw!r} is not true or false")
                kw[f.name] = raw.lower() in ("true", "1")
                continue
            number = float if isinstance(f.default, float) else int if isinstance(f.default, int) else None
            try:
                kw[f.name] = number(raw) if number else raw
            except ValueError:
                raise ValueError(f"ARGOSY_{f.name.upper()}={raw!r} is not a number") from None
        return cls(**kw)
