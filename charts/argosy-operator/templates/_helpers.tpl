{{/*
Name helpers. Object names are cut to 63 characters (a DNS label, and what a label value holds).
*/}}
{{- define "argosy-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "argosy-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "argosy-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object of the chart. app.kubernetes.io/name is "argosy-operator", never
"argosy": that value belongs to the runtime objects the operator creates.
*/}}
{{- define "argosy-operator.labels" -}}
helm.sh/chart: {{ include "argosy-operator.chart" . }}
{{ include "argosy-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: argosy
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "argosy-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "argosy-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "argosy-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "argosy-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "argosy-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Does the operator create one ServiceMonitor per InferenceService? Prints "true" or "false".
The chart-level ServiceMonitor replaces them, so asking for both is an error.
*/}}
{{- define "argosy-operator.perServiceMonitors" -}}
{{- $per := .Values.settings.serviceMonitor }}
{{- if .Values.serviceMonitor.enabled }}
{{- if eq (toString $per) "true" }}
{{- fail "serviceMonitor.enabled and settings.serviceMonitor: true would scrape every runtime pod twice: choose one" }}
{{- end }}
{{- print "false" }}
{{- else if kindIs "invalid" $per }}
{{- print "true" }}
{{- else }}
{{- toString $per }}
{{- end }}
{{- end }}

{{/*
A settings value as an environment variable value: whole numbers without a decimal point or
exponent (YAML numbers may arrive as float64, and 1000000 would print as 1e+06), everything
else as its string.
*/}}
{{- define "argosy-operator.envValue" -}}
{{- if and (kindIs "float64" .) (eq (floor .) .) }}
{{- printf "%d" (int64 .) }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/*
RBAC rules for the namespaces whose InferenceServices the operator manages. Every child
kind the operator renders (argosy.operator.render) is listed: server-side apply needs
create and patch, the status refresh reads children with get, orphans are found with list
(by label) and removed with delete; passes read them from a label-selected list-and-watch
cache (argosy.operator.informer): list and watch.
*/}}
{{- define "argosy-operator.namespacedRules" -}}
- apiGroups: ["serving.argosy.dev"]
  resources: ["inferenceservices"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["serving.argosy.dev"]
  resources: ["inferenceservices/status"]
  verbs: ["get", "patch", "update"]
# children carry blockOwnerDeletion: under OwnerReferencesPermissionEnforcement that needs
# update on the owner's finalizers
- apiGroups: ["serving.argosy.dev"]
  resources: ["inferenceservices/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims", "services"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# list: a Pending cache claim's ProvisioningFailed events, surfaced in status
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch", "list"]
- apiGroups: [""]
  resources: ["resourcequotas"]
  verbs: ["get", "list", "create", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["deployments/scale"]
  verbs: ["get", "patch"]
# spec.router: the router's ServiceAccount, Role and RoleBinding; the operator must hold the
# EndpointSlice reads it grants (RBAC lets no one grant what it does not have)
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{/*
Cluster-scoped GPU quota accounting: GPUQuotas are cluster-scoped, and a quota charges the
InferenceServices of every namespace it covers (read-only there).
*/}}
{{- define "argosy-operator.quotaRules" -}}
- apiGroups: ["serving.argosy.dev"]
  resources: ["gpuquotas"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["serving.argosy.dev"]
  resources: ["gpuquotas/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["serving.argosy.dev"]
  resources: ["inferenceservices"]
  verbs: ["list"]
{{- end }}

{{/*
Cluster-scoped reads kopf uses to notice resources and namespaces appearing.
*/}}
{{- define "argosy-operator.discoveryRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
