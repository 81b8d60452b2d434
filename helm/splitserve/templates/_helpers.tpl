{{/*
Names, labels, the image and the pod-level pieces every workload shares.
Role-specific pool rendering lives in _pool.tpl, the router's in _router.tpl,
impossible value combinations are refused in _validate.tpl.
*/}}

{{- define "splitserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "splitserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "splitserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object name of one component: <fullname>-<role>. Call with (dict "ctx" $ "role" "prefill"). */}}
{{- define "splitserve.componentName" -}}
{{- printf "%s-%s" (include "splitserve.fullname" .ctx) .role }}
{{- end }}

{{/* Selector labels of one component; pools and the router are told apart by splitserve.io/role. */}}
{{- define "splitserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "splitserve.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
splitserve.io/role: {{ .role }}
{{- end }}

{{/* Every label of one component's objects. */}}
{{- define "splitserve.labels" -}}
helm.sh/chart: {{ include "splitserve.chart" .ctx }}
{{ include "splitserve.selectorLabels" . }}
app.kubernetes.io/component: {{ .role }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: splitserve
{{- if has .role (list "prefill" "decode" "unified") }}
splitserve.io/engine: "true"
{{- end }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selects every engine pod (prefill, decode, unified) of this release. */}}
{{- define "splitserve.engineSelectorLabels" -}}
app.kubernetes.io/name: {{ include "splitserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
splitserve.io/engine: "true"
{{- end }}

{{/* Enabled pools, as a JSON list ("prefill", "decode") or ("unified"). */}}
{{- define "splitserve.enabledPools" -}}
{{- $pools := list }}
{{- range $role := list "prefill" "decode" "unified" }}
{{- if (index $.Values $role).enabled }}
{{- $pools = append $pools $role }}
{{- end }}
{{- end }}
{{- toJson $pools }}
{{- end }}

{{/* The image reference; the tag defaults to the chart's appVersion and is never `latest`. */}}
{{- define "splitserve.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag | toString }}
{{- if eq $tag "latest" }}
{{- fail "image.tag: `latest` is refused; pin a version (empty = the chart's appVersion)" }}
{{- end }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{- define "splitserve.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod-level security context of every pod of the chart. */}}
{{- define "splitserve.podSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 1000
  runAsGroup: 1000
  fsGroup: 1000
  seccompProfile:
    type: RuntimeDefault
{{- end }}

{{/* Container-level security context of every container of the chart. */}}
{{- define "splitserve.containerSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 1000
  runAsGroup: 1000
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop:
      - ALL
  seccompProfile:
    type: RuntimeDefault
{{- end }}

{{/* `--grpc-ssl-*` flags of every pod and the router when grpcTLS.enabled (the Secret mounted at /etc/splitserve/grpc-tls). */}}
{{- define "splitserve.grpcTLS.args" -}}
{{- if .Values.grpcTLS.enabled }}
- --grpc-ssl-certfile
- /etc/splitserve/grpc-tls/tls.crt
- --grpc-ssl-keyfile
- /etc/splitserve/grpc-tls/tls.key
- --grpc-ssl-ca-certs
- /etc/splitserve/grpc-tls/ca.crt
- --grpc-ssl-server-name
- {{ .Values.grpcTLS.serverName | quote }}
{{- end }}
{{- end }}

{{- define "splitserve.grpcTLS.volumeMount" -}}
{{- if .Values.grpcTLS.enabled }}
- name: grpc-tls
  mountPath: /etc/splitserve/grpc-tls
  readOnly: true
{{- end }}
{{- end }}

{{- define "splitserve.grpcTLS.volume" -}}
{{- if .Values.grpcTLS.enabled }}
- name: grpc-tls
  secret:
    secretName: {{ .Values.grpcTLS.secretName }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{/* Env every splitserve container gets: the downward API and a writable HOME. */}}
{{- define "splitserve.downwardEnv" -}}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: HOME
  value: /tmp
{{- end }}

{{/* Name of the Secret holding the API key, and its key. */}}
{{- define "splitserve.apiKeySecretName" -}}
{{- default (printf "%s-api-key" (include "splitserve.fullname" .)) .Values.apiKey.existingSecret }}
{{- end }}

{{/* The SPLITSERVE_API_KEY env entry (only from a Secret, never a literal). */}}
{{- define "splitserve.apiKeyEnv" -}}
{{- if .Values.apiKey.enabled }}
- name: SPLITSERVE_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "splitserve.apiKeySecretName" . }}
      key: {{ .Values.apiKey.secretKey }}
{{- end }}
{{- end }}

{{/* The router Service's in-cluster DNS name. */}}
{{- define "splitserve.routerHost" -}}
{{- printf "%s.%s.svc.cluster.local" (include "splitserve.componentName" (dict "ctx" . "role" "router")) .Release.Namespace }}
{{- end }}

{{/* Served model name: what clients send as "model". */}}
{{- define "splitserve.servedModelName" -}}
{{- default .Values.model.path .Values.model.servedModelName }}
{{- end }}
