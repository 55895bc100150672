"""The matrix of InferenceService specs the CRD must accept and the renderers must handle."""

SMOL = "hf://HuggingFaceTB/SmolLM2-135M-Instruct"

SPECS: dict[str, dict] = {
    "minimal": {"model": {"uri": SMOL}},
    "keda": {
        "model": {"uri": SMOL, "servedName": "smol"},
        "scaling": {"autoscaler": "keda", "minReplicas": 1, "maxReplicas": 4,
                    "targets": {"waitingRequests": 3, "kvCacheUsage": 0.75}, "cooldownPeriod": 120},
    },
    "hpa": {
        "model": {"uri": SMOL},
        "scaling": {"autoscaler": "hpa", "minReplicas": 2, "maxReplicas": 6, "targets": {"kvCacheUsage": 0}},
    },
    "scale-to-zero": {
        "model": {"uri": SMOL},
        "scaling": {"autoscaler": "keda", "minReplicas": 1, "maxReplicas": 2, "idleReplicaCount": 0,
                    "prometheus": {"serverAddress": "http://prom.monitoring:9090"}},
        "router": {"enabled": True},
    },
    "existing-claim": {
        "model": {"uri": SMOL, "revision": "refs/pr/1"},
        "cache": {"existingClaimName": "shared-models"},
    },
    "tp2": {
        "model": {"uri": "hf://meta-llama/Llama-3.1-70B-Instruct"},
        "resources": {"gpus": 2, "cpu": 16, "memory": "200Gi", "sharedMemorySize": "16Gi"},
        "parallelism": {"tensor": 2},
        "runtime": {"maxModelLen": 8192, "maxNumBatchedTokens": 8192, "enableChunkedPrefill": False,
                    "enablePrefixCaching": False, "dtype": "bfloat16", "gpuMemoryUtilization": 0.92},
    },
    "tolerations": {
        "model": {"uri": SMOL},
        "resources": {"gpuProduct": "NVIDIA-H100-80GB-HBM3", "gpuResourceName": "nvidia.com/gpu"},
        "scheduling": {
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                            {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoExecute",
                             "tolerationSeconds": 60}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]}]}}},
            "priorityClassName": "inference",
        },
        "disruption": {"maxUnavailable": "50%"},
        "tenant": "team-a",
    },
    "pvc-model": {"model": {"uri": "pvc://models/llama/8b", "servedName": "llama-8b"}},
    "no-cache-gated": {
        "model": {"uri": SMOL, "revision": "main", "credentialsSecretRef": {"name": "hf", "key": "token"}},
        "cache": {"enabled": False},
        "runtime": {"env": [{"name": "ARGOSY_LOG", "value": "debug"},
                            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                    "extraArgs": ["--max-waiting-requests", "100"]},
    },
    "gguf-file": {
        "model": {"uri": "hf://bartowski/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q4_K_M.gguf"},
        "cache": {"storageClassName": "standard", "accessMode": "ReadWriteOnce", "size": "5Gi"},
        "resources": {"gpus": 0, "cpu": "2", "memory": "4Gi"},
    },
    "s3-prefetch-off": {
        "model": {"uri": "s3://models/llama-3-8b"},
        "cache": {"existingClaimName": "s3-mirror", "prefetch": False},
        "scaling": {"minReplicas": 0},
    },
    "router-from-zero": {
        "model": {"uri": SMOL, "servedName": "smol"},
        "scaling": {"autoscaler": "keda", "minReplicas": 0, "maxReplicas": 3},
        "router": {"enabled": True, "replicas": 2, "routing": "prefix", "pendingTimeoutSeconds": 600,
                   "maxInflightPerUpstream": 8, "tenantsSecretRef": {"name": "llm-tenants"}},
    },
    "router-no-cache": {
        "model": {"uri": SMOL},
        "cache": {"enabled": False},
        "router": {"enabled": True, "routing": "least-load", "cpu": "1", "memory": "512Mi"},
    },
}
