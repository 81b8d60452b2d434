{{/*
The pool's Service, PodDisruptionBudget and KEDA ScaledObject, parameterised
by role like the Deployment: each takes (dict "ctx" $ "role" ROLE).
*/}}

{{/* Headless Service: the router watches its EndpointSlices (port `grpc`); not-ready pods are not published. */}}
{{- define "splitserve.pool.service" -}}
{{- $ctx := .ctx }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "splitserve.componentName" . }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "splitserve.labels" . | trim | nindent 4 }}
spec:
  clusterIP: None
  publishNotReadyAddresses: false
  selector:
    {{- include "splitserve.selectorLabels" . | trim | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $ctx.Values.podPorts.grpc }}
      targetPort: grpc
      protocol: TCP
    - name: http
      port: {{ $ctx.Values.podPorts.http }}
      targetPort: http
      protocol: TCP
{{- end }}

{{- define "splitserve.pool.pdb" -}}
{{- $ctx := .ctx }}
{{- $pool := index $ctx.Values .role }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "splitserve.componentName" . }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "splitserve.labels" . | trim | nindent 4 }}
spec:
  maxUnavailable: {{ $pool.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "splitserve.selectorLabels" . | trim | nindent 6 }}
{{- end }}

{{/* Default PromQL of the prometheus trigger: prefill scales on waiting work, decode and unified on KV usage. */}}
{{- define "splitserve.pool.prometheusQuery" -}}
{{- $pool := index .ctx.Values .role }}
{{- $sel := printf "namespace=%q,pool=%q" .ctx.Release.Namespace .role }}
{{- if $pool.autoscaling.prometheus.query }}
{{- $pool.autoscaling.prometheus.query }}
{{- else if eq .role "prefill" }}
{{- printf "sum(splitserve:num_requests_waiting{%s} or vector(0)) + sum(splitserve:router_queued_requests{%s} or vector(0))" $sel $sel }}
{{- else }}
{{- printf "sum(splitserve:kv_cache_usage_perc{%s} or vector(0)) + sum(splitserve:router_queued_requests{%s} or vector(0))" $sel $sel }}
{{- end }}
{{- end }}

{{/* KEDA ScaledObject: the router's external-push scaler by default, a Prometheus query as the alternative. */}}
{{- define "splitserve.pool.scaledObject" -}}
{{- $ctx := .ctx }}
{{- $a := (index $ctx.Values .role).autoscaling }}
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: {{ include "splitserve.componentName" . }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "splitserve.labels" . | trim | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "splitserve.componentName" . }}
  minReplicaCount: {{ $a.minReplicas }}
  maxReplicaCount: {{ $a.maxReplicas }}
  {{- if not (kindIs "invalid" $a.idleReplicaCount) }}
  idleReplicaCount: {{ $a.idleReplicaCount }}
  {{- end }}
  pollingInterval: {{ $a.pollingInterval }}
  cooldownPeriod: {{ $a.cooldownPeriod }}
  {{- with $a.behavior }}
  advanced:
    horizontalPodAutoscalerConfig:
      behavior:
        {{- toYaml . | nindent 8 }}
  {{- end }}
  triggers:
    {{- if eq $a.trigger "external" }}
    - type: external-push
      metadata:
        scalerAddress: {{ printf "%s:%v" (include "splitserve.routerHost" $ctx) $ctx.Values.router.scalerPort | quote }}
        pool: {{ .role }}
        target: {{ $a.target | quote }}
    {{- else }}
    - type: prometheus
      metadata:
        serverAddress: {{ $a.prometheus.serverAddress | quote }}
        query: {{ include "splitserve.pool.prometheusQuery" . | quote }}
        threshold: {{ $a.prometheus.threshold | quote }}
        activationThreshold: {{ $a.prometheus.activationThreshold | quote }}
    {{- end }}
{{- end }}
