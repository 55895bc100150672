"""The ``InferenceService`` API (``serving.argosy.dev/v1alpha1``): the single source of truth.

The pydantic models here define the custom resource. :mod:`argosy.operator.crdgen`
turns them into the CRD's OpenAPI v3 schema (descriptions, defaults, enums, bounds) and
copies each model's :data:`CEL_RULES` into ``x-kubernetes-validations``, so the API
server enforces what the operator assumes. The same cross-field rules are mirrored in
pydantic validators, so objects built in Python (tests, the operator's own parsing) fail
the same way. Field names are camelCase on the wire (Kubernetes API conventions) and
snake_case in Python.

Parse a custom resource with :func:`parse`; it raises :class:`pydantic.ValidationError`
on an invalid object.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel

GROUP = "serving.argosy.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "InferenceService"
PLURAL = "inferenceservices"
SINGULAR = "inferenceservice"
#: ``kubectl get ais``. Not ``isvc``, which KServe's InferenceService already uses.
SHORT_NAMES = ["ais"]
CATEGORIES = ["argosy"]

#: Longest InferenceService name: children are named ``<name>-<suffix>`` (at most 16
#: characters, e.g. ``-prefetch-1a2b3c``) and must stay within 63 characters, the
#: limit of a label value and of a Service name.
MAX_NAME_LENGTH = 45
#: Port of ``argosy serve`` (HTTP API, ``/health`` and ``/metrics``).
SERVER_PORT = 8000
#: Port of the `argosy router` pods and Service (``spec.router``).
ROUTER_PORT = 8080

_URI_PATTERN = r"^(hf://[A-Za-z0-9][\w.-]*/[\w.-]+(/[^\s]+)?|(s3|gs)://[a-z0-9][a-z0-9._-]*(/[^\s]*)?|pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/[^\s]*)?)$"
# Kubernetes resource quantity without sign, e.g. 500m, 16Gi, 1.5, 2e3.
_QUANTITY_PATTERN = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][0-9]+)?$"
_PERCENT_PATTERN = r"^[0-9]+%$"
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def _check_quantity(v: Union[int, str]) -> Union[int, str]:
    if isinstance(v, int):
        if v < 0:
            raise ValueError("a quantity must not be negative")
    elif not re.match(_QUANTITY_PATTERN, v):
        raise ValueError(f"{v!r} is not a Kubernetes quantity (e.g. 500m, 16Gi)")
    return v


def _check_int_or_percent(v: Union[int, str]) -> Union[int, str]:
    if isinstance(v, int):
        if v < 0:
            raise ValueError("must not be negative")
    elif not re.match(_PERCENT_PATTERN, v):
        raise ValueError(f"{v!r} is neither an integer nor a percentage such as 25%")
    return v


#: A Kubernetes resource quantity: an integer or a string such as ``16Gi`` or ``500m``.
Quantity = Annotated[
    Union[int, str],
    AfterValidator(_check_quantity),
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}], "pattern": _QUANTITY_PATTERN,
                    "x-kubernetes-int-or-string": True}),
]
#: An integer or a percentage string such as ``25%`` (PodDisruptionBudget style).
IntOrPercent = Annotated[
    Union[int, str],
    AfterValidator(_check_int_or_percent),
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}], "pattern": r"^([0-9]+|[0-9]+%)$",
                    "x-kubernetes-int-or-string": True}),
]
#: A JSON object kept as is (the API server keeps unknown fields below it).
FreeObject = Annotated[dict[str, Any], WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True})]


class Rule(NamedTuple):
    """One CEL validation rule, rendered as an entry of ``x-kubernetes-validations`` on the
    schema of the model that declares it, where ``self`` is an object of that model
    (Kubernetes "CRD validation rules"). ``field_path`` (e.g. ``.maxReplicas``) tells
    clients which field the message is about."""

    rule: str
    message: str
    field_path: Optional[str] = None


def _cel_schema_extra(schema: dict, cls: type) -> None:
    # pydantic hook: put the model's CEL rules into its JSON schema (crdgen keeps them).
    rules = getattr(cls, "CEL_RULES", [])
    if rules:
        schema["x-kubernetes-validations"] = [
            {"rule": r.rule, "message": r.message, **({"fieldPath": r.field_path} if r.field_path else {})}
            for r in rules
        ]


class _Model(BaseModel):
    """Base: camelCase on the wire, unknown fields rejected (the CRD prunes them anyway)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              json_schema_extra=_cel_schema_extra)
    #: CEL rules copied into this model's ``x-kubernetes-validations`` by crdgen.
    CEL_RULES: ClassVar[list[Rule]] = []


# ---------------------------------------------------------------------------- spec
class SecretRef(_Model):
    """A key of a Secret in the InferenceService's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Secret.")
    key: str = Field("HF_TOKEN", min_length=1, max_length=253,
                     description="Key in the Secret whose value becomes the HF_TOKEN environment variable of the "
                                 "download (and, with the cache disabled, of the server).")


class ModelSource(_Model):
    """Where the model comes from."""

    uri: str = Field(
        max_length=1024, pattern=_URI_PATTERN,
        description="Model location: hf://ORG/NAME (a Hugging Face hub repository; hf://ORG/NAME/FILE.gguf picks one "
                    "file of it), s3://BUCKET/PREFIX or gs://BUCKET/PREFIX (not downloaded by the operator yet: "
                    "with cache.existingClaimName and cache.prefetch false only), or pvc://CLAIM/PATH (a model already on a "
                    "PersistentVolumeClaim in this namespace).")
    revision: Optional[str] = Field(None, max_length=255,
                                    description="Hub revision (branch, tag or commit) for hf:// models; default main.")
    served_name: Optional[str] = Field(None, max_length=255,
                                       description="Model name clients send and /v1/models reports "
                                                   "(--served-model-name); default: the server's choice.")
    credentials_secret_ref: Optional[SecretRef] = Field(
        None, description="Secret holding the hub token for gated or private models.")


class EnvVar(_Model):
    """An environment variable of the server container (as in a Pod's container env)."""

    name: str = Field(min_length=1, max_length=1024, description="Variable name.")
    value: Optional[str] = Field(None, description="Literal value.")
    value_from: Optional[FreeObject] = Field(None, description="Source of the value (a Pod EnvVarSource).")

    CEL_RULES: ClassVar[list[Rule]] = [
        Rule("!(has(self.value) && has(self.valueFrom))", "set value or valueFrom, not both"),
    ]

    @model_validator(mode="after")
    def _one_source(self):
        if self.value is not None and self.value_from is not None:
            raise ValueError("set value or valueFrom, not both")
        return self


class RuntimeSpec(_Model):
    """Settings of the serving runtime; each maps to the ``argosy serve`` flag of the same vLLM name."""

    image: Optional[str] = Field(None, max_length=1024,
                                 description="Runtime container image; default: the operator's configured image.")
    max_model_len: Optional[int] = Field(None, ge=1, description="Context length in tokens (--max-model-len).")
    gpu_memory_utilization: Optional[float] = Field(
        None, gt=0, le=1, description="Fraction of GPU memory for weights, activations and KV cache "
                                      "(--gpu-memory-utilization).")
    max_num_seqs: Optional[int] = Field(None, ge=1, description="Most sequences per engine step (--max-num-seqs).")
    max_num_batched_tokens: Optional[int] = Field(
        None, ge=1, description="Token budget per engine step (--max-num-batched-tokens).")
    enable_prefix_caching: Optional[bool] = Field(None, description="Reuse KV cache across shared prompt prefixes "
                                                                    "(--[no-]enable-prefix-caching); default on.")
    enable_chunked_prefill: Optional[bool] = Field(None, description="Split long prompts across steps "
                                                                     "(--[no-]enable-chunked-prefill); default on.")
    dtype: Optional[Literal["auto", "float32", "bfloat16", "float16"]] = Field(
        None, description="Weight and activation dtype (--dtype).")
    quantization: Optional[Literal["gguf", "compressed-tensors", "awq", "gptq", "awq_marlin", "gptq_marlin",
                                   "fp8"]] = Field(
        None, description="Quantization method (--quantization): detected from the model when unset (GGUF files; a "
                          "Hugging Face directory's quantization_config: compressed-tensors, awq, gptq, fp8); a checkpoint "
                          "method must be the checkpoint's own (awq_marlin / gptq_marlin are taken as awq / gptq), "
                          "else the server refuses to start; fp8 on a float Hugging Face checkpoint quantizes its "
                          "linear layers at load (online FP8: E4M3 weights, one scale per output row, per-token FP8 "
                          "activations on GPUs whose torch._scaled_mm takes row-wise scales).")
    kv_cache_dtype: Optional[Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]] = Field(
        None, description="KV cache element type (--kv-cache-dtype): auto (the model dtype) or fp8 / fp8_e4m3 / "
                          "fp8_e5m2, one byte a value, twice the cached tokens in the same memory (with fp8 / "
                          "fp8_e4m3 the checkpoint's per-tensor KV-cache scales when it has them, else unscaled, "
                          "as vLLM).")
    shutdown_timeout_seconds: int = Field(
        30, ge=0, le=3600,
        description="Seconds a stopping server lets in-flight requests finish (--shutdown-timeout); the pod's "
                    "termination grace period is set above it.")
    extra_args: list[str] = Field(default_factory=list, max_length=128,
                                  description="More arguments appended to `argosy serve`.")
    env: list[EnvVar] = Field(
        default_factory=list, max_length=128, description="Extra environment variables of the server.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]})

    CEL_RULES: ClassVar[list[Rule]] = [
        Rule("!has(self.maxNumBatchedTokens) || !has(self.maxModelLen) || "
             "!has(self.enableChunkedPrefill) || self.enableChunkedPrefill || "
             "self.maxNumBatchedTokens >= self.maxModelLen",
             "maxNumBatchedTokens must be at least maxModelLen when chunked prefill is disabled",
             ".maxNumBatchedTokens"),
    ]

    @model_validator(mode="after")
    def _budget(self):
        if (self.max_num_batched_tokens is not None and self.max_model_len is not None
                and self.enable_chunked_prefill is False and self.max_num_batched_tokens < self.max_model_len):
            raise ValueError("maxNumBatchedTokens must be at least maxModelLen when chunked prefill is disabled")
        return self


class ResourcesSpec(_Model):
    """Compute for each replica."""

    gpus: Optional[int] = Field(None, ge=0, le=64, description="GPUs per replica (requests = limits); default: "
                                "parallelism.tensor (one GPU per tensor-parallel rank). 0 runs on CPU.")
    gpu_resource_name: str = Field("nvidia.com/gpu", max_length=253,
                                   description="Extended resource name of the GPU.")
    gpu_product: Optional[str] = Field(
        None, max_length=63,
        description="GPU model to schedule on, matched against the node label nvidia.com/gpu.product "
                    "(e.g. NVIDIA-H100-80GB-HBM3).")
    cpu: Optional[Quantity] = Field(None, description="CPU request per replica (e.g. 4 or 3500m).")
    memory: Optional[Quantity] = Field(None, description="Memory request and limit per replica (e.g. 32Gi).")
    shared_memory_size: Optional[Quantity] = Field(
        None, description="Size limit of the memory-backed /dev/shm (mounted when parallelism.tensor > 1); "
                          "default: unlimited within the pod's memory.")


class ParallelismSpec(_Model):
    """How one replica spreads the model over its GPUs."""

    tensor: int = Field(1, ge=1, le=64, description="Tensor-parallel ranks (--tensor-parallel-size).")


#: CEL: the operator's own cache claim existed before and still does (the transition rules
#: below hold only then); written as the negation, for ``A || rule``.
_OWN_CLAIM_BOTH = ("!(self.enabled && oldSelf.enabled && !has(self.existingClaimName) && "
                   "!has(oldSelf.existingClaimName))")


class CacheSpec(_Model):
    """The model cache: a PersistentVolumeClaim the prefetch Job fills once and every replica mounts read-only."""

    enabled: bool = Field(True, description="Use a model cache. When false each server downloads the model at "
                                            "startup into an emptyDir.")
    storage_class_name: Optional[str] = Field(None, max_length=253,
                                              description="StorageClass of the claim the operator creates.")
    access_mode: Literal["ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod", "ReadOnlyMany"] = Field(
        "ReadWriteMany", description="Access mode of the claim the operator creates; ReadWriteMany lets replicas on "
                                     "different nodes share it.")
    size: Quantity = Field("50Gi", description="Size of the claim the operator creates.")
    existing_claim_name: Optional[str] = Field(
        None, max_length=253, pattern=_DNS_LABEL[:-1] + r"(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
        description="Use this existing claim instead of creating one.")
    prefetch: bool = Field(True, description="Download the model into the cache with a Job before the servers "
                                             "start. When false the claim must already hold the model.")

    CEL_RULES: ClassVar[list[Rule]] = [
        Rule("!has(self.existingClaimName) || !has(self.storageClassName)",
             "storageClassName applies only to a claim the operator creates; leave it out with existingClaimName",
             ".storageClassName"),
        Rule("!self.enabled || self.prefetch || has(self.existingClaimName)",
             "prefetch: false needs existingClaimName, a claim that already holds the model", ".prefetch"),
        # Transition rules (oldSelf: the stored object; Kubernetes runs them on updates only):
        # a PersistentVolumeClaim's spec is immutable except a growing storage request, so
        # while the operator's claim exists these changes could never be applied.
        Rule(_OWN_CLAIM_BOTH + " || (has(self.storageClassName) ? self.storageClassName : '') == "
             "(has(oldSelf.storageClassName) ? oldSelf.storageClassName : '')",
             "cache.storageClassName cannot change while the operator's cache claim exists (a claim's spec is "
             "immutable): delete the claim (kubectl delete pvc NAME-model-cache) and its pods, or create a new "
             "InferenceService", ".storageClassName"),
        Rule(_OWN_CLAIM_BOTH + " || self.accessMode == oldSelf.accessMode",
             "cache.accessMode cannot change while the operator's cache claim exists (a claim's spec is immutable): "
             "delete the claim and its pods, or create a new InferenceService", ".accessMode"),
        Rule(_OWN_CLAIM_BOTH + " || quantity(string(self.size)).compareTo(quantity(string(oldSelf.size))) >= 0",
             "cache.size cannot shrink (a claim only grows, and only where its StorageClass allows expansion)",
             ".size"),
    ]

    @model_validator(mode="after")
    def _claim(self):
        if self.existing_claim_name is not None and self.storage_class_name is not None:
            raise ValueError("storageClassName applies only to a claim the operator creates; "
                             "leave it out with existingClaimName")
        if self.enabled and not self.prefetch and self.existing_claim_name is None:
            raise ValueError("prefetch: false needs existingClaimName, a claim that already holds the model")
        return self


class ScalingTargets(_Model):
    """Per-replica targets the autoscaler keeps the service at; 0 turns a target off."""

    waiting_requests: float = Field(
        5.0, ge=0, description="Requests waiting in the queue (vllm:num_requests_waiting) per replica.")
    kv_cache_usage: float = Field(
        0.8, ge=0, le=1, description="KV cache usage fraction (vllm:kv_cache_usage_perc) per replica, 0 to 1.")

    CEL_RULES: ClassVar[list[Rule]] = [
        Rule("self.waitingRequests > 0.0 || self.kvCacheUsage > 0.0", "at least one scaling target must be above 0"),
    ]

    @model_validator(mode="after")
    def _some_target(self):
        if not (self.waiting_requests > 0 or self.kv_cache_usage > 0):
            raise ValueError("at least one scaling target must be above 0")
        return self


class PrometheusSpec(_Model):
    """Where the KEDA Prometheus scaler (or the builtin autoscaler) reads the metrics."""

    server_address: Optional[str] = Field(None, max_length=1024,
                                          description="Prometheus URL; default: the operator's configured address.")


class ScalingSpec(_Model):
    """Replica count and autoscaling."""

    min_replicas: int = Field(
        1, ge=0, le=1000,
        description="Replicas without an autoscaler; the lower bound with one (0 with keda or builtin scales to "
                    "zero and needs router.enabled). `kubectl scale` sets this field.")
    max_replicas: Optional[int] = Field(None, ge=1, le=1000,
                                        description="Upper bound for the autoscaler (required with keda or hpa).")
    autoscaler: Literal["keda", "hpa", "none", "builtin"] = Field(
        "none", description="keda: a KEDA ScaledObject with Prometheus triggers; hpa: an autoscaling/v2 "
                            "HorizontalPodAutoscaler on pod metrics served by Prometheus Adapter; none: fixed "
                            "minReplicas; builtin: the operator itself queries Prometheus and scales the "
                            "Deployment (for clusters without KEDA or Prometheus Adapter).")
    targets: ScalingTargets = Field(default_factory=ScalingTargets, description="Scaling targets.")
    prometheus: PrometheusSpec = Field(default_factory=PrometheusSpec,
                                       description="Prometheus for KEDA and the builtin autoscaler.")
    cooldown_period: int = Field(300, ge=0, le=86400,
                                 description="Seconds without load before scaling down (KEDA cooldownPeriod, the "
                                             "HPA's scale-down stabilization window).")
    idle_replica_count: Optional[int] = Field(
        None, ge=0, le=0,
        description="Scale to zero: replicas while idle (only 0 is supported; keda only; minReplicas must be "
                    "at least 1; needs router.enabled, whose held requests bring a replica back).")

    CEL_RULES: ClassVar[list[Rule]] = [
        Rule("!has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
             "minReplicas must not exceed maxReplicas", ".minReplicas"),
        Rule("self.autoscaler == 'none' || has(self.maxReplicas)",
             "maxReplicas is required when an autoscaler is set", ".maxReplicas"),
        Rule("self.autoscaler != 'hpa' || self.minReplicas >= 1",
             "an HPA cannot scale to zero: use minReplicas >= 1, or autoscaler keda", ".minReplicas"),
        Rule("!has(self.idleReplicaCount) || self.autoscaler == 'keda'",
             "idleReplicaCount (scale to zero) needs autoscaler keda", ".idleReplicaCount"),
        Rule("!has(self.idleReplicaCount) || self.idleReplicaCount < self.minReplicas",
             "idleReplicaCount must be below minReplicas", ".idleReplicaCount"),
    ]

    @model_validator(mode="after")
    def _bounds(self):
        if self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError("minReplicas must not exceed maxReplicas")
        if self.autoscaler != "none" and self.max_replicas is None:
            raise ValueError("maxReplicas is required when an autoscaler is set")
        if self.autoscaler == "hpa" and self.min_replicas < 1:
            raise ValueError("an HPA cannot scale to zero: use minReplicas >= 1, or autoscaler keda")
        if self.idle_replica_count is not None:
            if self.autoscaler != "keda":
                raise ValueError("idleReplicaCount (scale to zero) needs autoscaler keda")
            if self.idle_replica_count >= self.min_replicas:
                raise ValueError("idleReplicaCount must be below minReplicas")
        return self


class Toleration(_Model):
    """A Pod toleration (core/v1 Toleration)."""

    key: Optional[str] = Field(None, max_length=316, description="Taint key; empty with Exists matches all taints.")
    # maxLength bounds the cost the API server estimates for the CEL rule below
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.",
                                                 json_schema_extra={"maxLength": 6})
    value: Optional[str] = Field(None, max_length=63, description="Taint value (Equal only).")
    effect: Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]] = Field(
        None, description="Taint effect to match; empty matches all.")
    toleration_seconds: Optional[int] = Field(None, description="How long a NoExecute taint is tolerated.")

    CEL_RULES: ClassVar[list[Rule]] = [
        Rule("self.operator != 'Exists' || !has(self.value)", "value must be empty when operator is Exists",
             ".value"),
    ]

    @model_validator(mode="after")
    def _exists(self):
        if self.operator == "Exists" and self.value is not None:
            raise ValueError("value must be empty when operator is Exists")
        return self


class SchedulingSpec(_Model):
    """Where the server pods may run."""

    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pods require.")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64, description="Tolerations of the pods.")
    affinity: Optional[FreeObject] = Field(None, description="Pod affinity (core/v1 Affinity), copied as is.")
    priority_class_name: Optional[str] = Field(None, max_length=253, description="PriorityClass of the pods.")


class DisruptionSpec(_Model):
    """Voluntary disruption budget (a PodDisruptionBudget over the server pods)."""

    max_unavailable: IntOrPercent = Field(1, description="Server pods that may be evicted at once (number or "
                                                         "percentage).")


class TenantsSecretRef(_Model):
    """A Secret key holding the router's tenants file (JSON: API keys -> tenants, per-tenant limits)."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Secret.")
    key: str = Field("tenants.json", min_length=1, max_length=253, description="Key in the Secret.")


class RouterSpec(_Model):
    """An `argosy router` in front of the server pods: prefix-cache-aware routing with the engines' own block
    hashes, and requests held while no server pod is ready (so scaling from zero can come back)."""

    enabled: bool = Field(False, description="Run the router; status.url then points at its Service.")
    replicas: int = Field(2, ge=1, le=100, description="Router pods (no GPU).")
    routing: Literal["prefix", "least-load", "round-robin"] = Field(
        "prefix", description="Routing policy (argosy router --routing).")
    max_pending: int = Field(1024, ge=0, le=1000000,
                             description="Requests held while no server pod is ready; more get 503.")
    pending_timeout_seconds: int = Field(300, ge=1, le=3600,
                                         description="Seconds a request is held before a 503 with Retry-After.")
    max_inflight_per_upstream: int = Field(
        0, ge=0, le=100000, description="Requests in flight per server pod before new ones wait in the router, "
                                        "served fairly between tenants (0: no limit).")
    tenants_secret_ref: Optional[TenantsSecretRef] = Field(
        None, description="Tenants file (argosy router --tenants): every request then needs a listed API key, "
                          "with per-tenant limits and usage metrics.")
    cpu: Quantity = Field("500m", description="CPU request per router pod.")
    memory: Quantity = Field("1Gi", description="Memory request and limit per router pod.")


#: Why an s3:// or gs:// model needs a claim filled outside the operator (no downloader yet).
OBJECT_STORE_MESSAGE = ("s3:// and gs:// models are not downloaded by the operator yet: copy the model into a claim, "
                        "then set cache.existingClaimName and cache.prefetch: false (or use hf:// or pvc://)")
#: Why scaling to zero needs the router (KEDA and the builtin autoscaler read the servers'
#: own gauges, which vanish with the last pod).
SCALE_FROM_ZERO_MESSAGE = ("scaling to zero (minReplicas 0 or idleReplicaCount) needs router.enabled: at zero replicas "
                           "no server exports metrics, and only the router's held requests bring a replica back")


class InferenceServiceSpec(_Model):
    """Desired state of an InferenceService: one model served by an autoscaled fleet of `argosy serve` pods."""

    model: ModelSource = Field(description="The model to serve.")
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec, description="Serving runtime settings.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Compute per replica.")
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec, description="Parallelism per replica.")
    cache: CacheSpec = Field(default_factory=CacheSpec, description="Model cache volume.")
    scaling: ScalingSpec = Field(default_factory=ScalingSpec, description="Replicas and autoscaling.")
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec, description="Pod placement.")
    disruption: DisruptionSpec = Field(default_factory=DisruptionSpec, description="Disruption budget.")
    router: RouterSpec = Field(default_factory=RouterSpec, description="The request router in front of the "
                                                                       "server pods.")
    tenant: Optional[str] = Field(None, max_length=63, pattern=_DNS_LABEL,
                                  description="Tenant that owns this service (label serving.argosy.dev/tenant on "
                                              "its objects; used for quotas).")

    CEL_RULES: ClassVar[list[Rule]] = [
        Rule("!has(self.resources.gpus) || self.resources.gpus % self.parallelism.tensor == 0",
             "resources.gpus must be a multiple of parallelism.tensor", ".resources.gpus"),
        Rule("self.cache.enabled || self.model.uri.startsWith('pvc://') || "
             "self.model.uri.matches('^hf://[^/]+/[^/]+$')",
             "with the cache disabled the server downloads the model itself, which works only for hf://ORG/NAME "
             "(s3://, gs:// and single-file URIs need the cache)", ".cache.enabled"),
        Rule("!(self.model.uri.startsWith('s3://') || self.model.uri.startsWith('gs://')) || "
             "(self.cache.enabled && !self.cache.prefetch)", OBJECT_STORE_MESSAGE, ".model.uri"),
        Rule("self.router.enabled || !(self.scaling.autoscaler in ['keda', 'builtin'] && "
             "(self.scaling.minReplicas == 0 || has(self.scaling.idleReplicaCount)))",
             SCALE_FROM_ZERO_MESSAGE, ".router.enabled"),
    ]

    @model_validator(mode="after")
    def _cross(self):
        if self.resources.gpus is None:  # one GPU per tensor-parallel rank
            self.resources.gpus = self.parallelism.tensor
        if self.resources.gpus % self.parallelism.tensor:
            raise ValueError("resources.gpus must be a multiple of parallelism.tensor")
        uri = self.model.uri
        if not (self.cache.enabled or uri.startswith("pvc://") or re.match(r"^hf://[^/]+/[^/]+$", uri)):
            raise ValueError("with the cache disabled the server downloads the model itself, which works only for "
                             "hf://ORG/NAME (s3://, gs:// and single-file URIs need the cache)")
        if uri.startswith(("s3://", "gs://")) and not (self.cache.enabled and not self.cache.prefetch):
            raise ValueError(OBJECT_STORE_MESSAGE)
        s = self.scaling
        if s.autoscaler in ("keda", "builtin") and (s.min_replicas == 0 or s.idle_replica_count is not None) \
                and not self.router.enabled:
            raise ValueError(SCALE_FROM_ZERO_MESSAGE)
        return self


# -------------------------------------------------------------------------- status
class Condition(_Model):
    """A condition, as metav1.Condition (Kubernetes API conventions)."""

    type: str = Field(max_length=316, description="Ready, ModelCached, WorkloadReady, ScalingReady or "
                                                         "ChildrenApplied.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(max_length=1024, description="CamelCase reason for the last transition.")
    message: str = Field("", max_length=32768, description="Human-readable details.")
    last_transition_time: str = Field(json_schema_extra={"format": "date-time"},
                                      description="When status last changed (RFC 3339).")
    observed_generation: Optional[int] = Field(None, ge=0, description="metadata.generation this condition is "
                                                                        "based on.")


class AutoscalerStatus(_Model):
    """The builtin autoscaler's last decision (``scaling.autoscaler: builtin`` only)."""

    desired_replicas: int = Field(ge=0, description="Replicas it set the Deployment to.")
    reason: str = Field(max_length=64, description="CamelCase reason: ScaleUp, ScaleDown, NoChange, "
                                                   "StabilizingDown, StepLimited, LimitedByMax, QuotaLimited, "
                                                   "BelowMin or MetricsUnavailable.")
    message: str = Field("", max_length=4096, description="The decision and its inputs (metric sums, targets, "
                                                          "bounds).")
    last_decision_time: Optional[str] = Field(None, json_schema_extra={"format": "date-time"},
                                              description="When it decided (RFC 3339).")


class InferenceServiceStatus(_Model):
    """Observed state, written by the operator."""

    observed_generation: Optional[int] = Field(None, description="metadata.generation last reconciled.")
    conditions: list[Condition] = Field(
        default_factory=list, max_length=16, description="Ready, ModelCached, WorkloadReady and ScalingReady.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    replicas: Optional[int] = Field(None, description="Server pods (the scale subresource's status replicas).")
    ready_replicas: Optional[int] = Field(None, description="Server pods passing their readiness probe.")
    selector: Optional[str] = Field(None, description="Label selector of the server pods (for the scale "
                                                      "subresource).")
    url: Optional[str] = Field(None, description="In-cluster OpenAI-compatible base URL.")
    autoscaler: Optional[AutoscalerStatus] = Field(None, description="The builtin autoscaler's last decision.")


class ObjectMeta(BaseModel):
    """The parts of ``metadata`` the operator reads; everything else is kept."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH, pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    namespace: str = "default"
    uid: Optional[str] = None
    generation: Optional[int] = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class InferenceService(BaseModel):
    """A whole ``InferenceService`` object (apiVersion, kind, metadata, spec, status)."""

    model_config = ConfigDict(populate_by_name=True)
    api_version: Literal["serving.argosy.dev/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["InferenceService"] = KIND
    metadata: ObjectMeta
    spec: InferenceServiceSpec
    status: Optional[InferenceServiceStatus] = None


#: CEL rules on the root of the object (``self`` is the whole InferenceService).
ROOT_CEL_RULES = [
    # Kubernetes already makes names DNS-1123 subdomains; no dots and a length cap make them
    # usable as Service names and child-name prefixes. (A leading digit, which a Service
    # name also forbids, is caught by ObjectMeta below: a regex on an unbounded string
    # would blow the API server's CEL cost budget.)
    Rule(f"self.metadata.name.size() <= {MAX_NAME_LENGTH} && !self.metadata.name.contains('.')",
         f"metadata.name must be at most {MAX_NAME_LENGTH} characters without dots (it names the Service and the "
         "other children)"),
]


def parse(obj: dict) -> InferenceService:
    """Validate a custom resource (as read from the API server or a YAML file).

    ``status`` is not validated (nor returned): it is the operator's own output, and one
    written by another version of the operator (a field this one does not know) must not
    make a good spec look invalid.

    Raises:
        pydantic.ValidationError: a field or a cross-field rule is violated.
    """
    return InferenceService.model_validate({k: v for k, v in obj.items() if k != "status"})


# ------------------------------------------------------------------------ GPUQuota
QUOTA_KIND = "GPUQuota"
QUOTA_PLURAL = "gpuquotas"
QUOTA_SINGULAR = "gpuquota"
QUOTA_SHORT_NAMES = ["gq"]
#: Longest GPUQuota name: it names the ResourceQuota ``argosy-gpu-<name>`` in each namespace.
MAX_QUOTA_NAME_LENGTH = 53


class LabelSelectorRequirement(_Model):
    """One matchExpressions entry of a label selector (meta/v1 LabelSelectorRequirement)."""

    key: str = Field(min_length=1, max_length=317, description="Label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="In, NotIn, Exists or DoesNotExist.", json_schema_extra={"maxLength": 12})
    values: list[str] = Field(default_factory=list, max_length=256,
                              description="Values for In and NotIn; empty for Exists and DoesNotExist.",
                              json_schema_extra={"items": {"type": "string", "maxLength": 63}})

    CEL_RULES: ClassVar[list[Rule]] = [
        Rule("(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",
             "values must be non-empty for In and NotIn and empty for Exists and DoesNotExist", ".values"),
    ]

    @model_validator(mode="after")
    def _values(self):
        if (self.operator in ("In", "NotIn")) != bool(self.values):
            raise ValueError("values must be non-empty for In and NotIn and empty for Exists and DoesNotExist")
        return self


class LabelSelector(_Model):
    """A label selector (meta/v1 LabelSelector): every ``matchLabels`` pair and every expression must hold."""

    match_labels: dict[str, str] = Field(default_factory=dict, description="Labels that must all be present "
                                                                           "with these values.")
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list, max_length=64, description="Requirements that must all hold.")


class GPUQuotaSpec(_Model):
    """Desired state of a GPUQuota: a GPU budget shared by the InferenceServices of some namespaces."""

    namespaces: Optional[list[Annotated[str, Field(max_length=63, pattern=_DNS_LABEL)]]] = Field(
        None, min_length=1, max_length=1000, description="Namespaces this quota covers (or namespaceSelector).")
    namespace_selector: Optional[LabelSelector] = Field(
        None, description="Label selector of the namespaces this quota covers (or namespaces).")
    tenant: Optional[str] = Field(
        None, max_length=63, pattern=_DNS_LABEL,
        description="Charge only InferenceServices whose spec.tenant is this; default: every InferenceService "
                    "in the covered namespaces.")
    gpus: int = Field(ge=0, le=1_000_000, description="Total GPUs the covered InferenceServices may hold: "
                                                      "guaranteed (minReplicas x gpus) at admission, possible "
                                                      "(maxReplicas x gpus) through the autoscaler cap.")
    per_product: dict[str, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict, max_length=64,
        description="GPUs per GPU model (resources.gpuProduct, e.g. NVIDIA-H100-80GB-HBM3), each within gpus.",
        json_schema_extra={"additionalProperties": {"type": "integer", "minimum": 0}})
    enforce_resource_quota: bool = Field(
        True, description="Also create a ResourceQuota on requests.<gpuResourceName> in each covered namespace "
                          "(the API server's backstop).")

    CEL_RULES: ClassVar[list[Rule]] = [
        Rule("has(self.namespaces) != has(self.namespaceSelector)",
             "set exactly one of namespaces and namespaceSelector"),
        Rule("self.gpus >= 0", "gpus must not be negative", ".gpus"),
        Rule("!has(self.perProduct) || self.perProduct.all(k, self.perProduct[k] <= self.gpus)",
             "a perProduct limit must not exceed gpus", ".perProduct"),
    ]

    @model_validator(mode="after")
    def _one_scope(self):
        if (self.namespaces is None) == (self.namespace_selector is None):
            raise ValueError("set exactly one of namespaces and namespaceSelector")
        if any(v > self.gpus for v in self.per_product.values()):
            raise ValueError("a perProduct limit must not exceed gpus")
        return self


class ChargedService(_Model):
    """One InferenceService charged to a GPUQuota."""

    namespace: str = Field(max_length=63, description="Namespace of the InferenceService.")
    name: str = Field(max_length=253, description="Name of the InferenceService.")
    gpus_reserved: int = Field(ge=0, description="minReplicas x resources.gpus.")
    gpus_max: int = Field(ge=0, description="GPUs it may reach after the autoscaler cap (maxReplicas x gpus).")


class GPUQuotaStatus(_Model):
    """Observed state of a GPUQuota, written by the operator."""

    observed_generation: Optional[int] = Field(None, description="metadata.generation last reconciled.")
    gpus_reserved: Optional[int] = Field(None, ge=0, description="Sum of minReplicas x gpus over the charged "
                                                                 "InferenceServices.")
    gpus_in_use: Optional[int] = Field(None, ge=0, description="GPUs of ready server pods of the charged "
                                                               "InferenceServices.")
    gpus_remaining: Optional[int] = Field(None, description="gpus minus gpusReserved.")
    services: list[ChargedService] = Field(default_factory=list, max_length=10000,
                                           description="The InferenceServices charged to this quota.")
    conditions: list[Condition] = Field(
        default_factory=list, max_length=16, description="Ready and Exceeded.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})


class QuotaMeta(BaseModel):
    """The parts of a GPUQuota's ``metadata`` the operator reads."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=MAX_QUOTA_NAME_LENGTH)
    uid: Optional[str] = None
    generation: Optional[int] = None


class GPUQuota(BaseModel):
    """A whole ``GPUQuota`` object (cluster-scoped)."""

    model_config = ConfigDict(populate_by_name=True)
    api_version: Literal["serving.argosy.dev/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["GPUQuota"] = QUOTA_KIND
    metadata: QuotaMeta
    spec: GPUQuotaSpec
    status: Optional[GPUQuotaStatus] = None


def parse_quota(obj: dict) -> GPUQuota:
    """Validate a GPUQuota object (``status`` ignored, as in :func:`parse`).

    Raises:
        pydantic.ValidationError: a field or a cross-field rule is violated.
    """
    return GPUQuota.model_validate({k: v for k, v in obj.items() if k != "status"})
