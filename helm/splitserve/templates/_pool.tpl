{{/*
One engine pool (prefill, decode or unified), parameterised by role. Every
helper takes (dict "ctx" $ "role" ROLE) and reads the pool's block
.Values.<role>; the three blocks have the same shape.
*/}}

{{/* Seconds the pool's drain may take after SIGTERM: prefill serves granted leases (kvLeaseSeconds), decode and unified finish streams (shutdownGraceSeconds). */}}
{{- define "splitserve.pool.drainSeconds" -}}
{{- $pool := index .ctx.Values .role }}
{{- if eq .role "prefill" }}
{{- $pool.kvLeaseSeconds | ceil | int }}
{{- else }}
{{- $pool.shutdownGraceSeconds | ceil | int }}
{{- end }}
{{- end }}

{{- define "splitserve.pool.terminationGracePeriodSeconds" -}}
{{- $pool := index .ctx.Values .role }}
{{- add (int $pool.preStopSleepSeconds) (int (include "splitserve.pool.drainSeconds" .)) (int $pool.drainMarginSeconds) }}
{{- end }}

{{/* `splitserve serve ROLE ...` arguments of the runtime contract. */}}
{{- define "splitserve.pool.args" -}}
{{- $ctx := .ctx }}
{{- $pool := index $ctx.Values .role }}
{{- $e := $pool.engine }}
- serve
- {{ .role }}
- --model
- {{ $ctx.Values.model.path | quote }}
- --served-model-name
- {{ include "splitserve.servedModelName" $ctx | quote }}
- --host
- {{ $ctx.Values.bindAddress | quote }}
- --port
- {{ $ctx.Values.podPorts.grpc | quote }}
- --http-port
- {{ $ctx.Values.podPorts.http | quote }}
- --advertise-address
- {{ printf "$(POD_IP):%v" $ctx.Values.podPorts.grpc | quote }}
- --agent-name
- $(POD_NAME)
- --kv-lease-seconds
- {{ $pool.kvLeaseSeconds | quote }}
- --shutdown-grace-seconds
- {{ $pool.shutdownGraceSeconds | quote }}
{{- with include "splitserve.grpcTLS.args" $ctx | trim }}
{{ . }}
{{- end }}
{{- with $pool.ucxTls }}
- --ucx-tls
- {{ . | quote }}
{{- end }}
{{- if $pool.nixlProgressThread }}
- --nixl-progress-thread
{{- end }}
- --dtype
- {{ $e.dtype | quote }}
- --block-size
- {{ $e.blockSize | quote }}
- --attention-backend
- {{ $e.attentionBackend | quote }}
{{- range $key, $flag := dict "maxModelLen" "--max-model-len" "maxNumSeqs" "--max-num-seqs" "maxNumBatchedTokens" "--max-num-batched-tokens" "kvCacheMemory" "--kv-cache-memory" "gpuMemoryUtilization" "--gpu-memory-utilization" }}
{{- $value := index $e $key }}
{{- if not (kindIs "invalid" $value) }}
- {{ $flag }}
- {{ $value | quote }}
{{- end }}
{{- end }}
{{- range $pool.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* Requests and limits, with nvidia.com/gpu added to both when gpus > 0. */}}
{{- define "splitserve.pool.resources" -}}
{{- $pool := index .ctx.Values .role }}
{{- $requests := deepCopy (default (dict) $pool.resources.requests) }}
{{- $limits := deepCopy (default (dict) $pool.resources.limits) }}
{{- if gt (int $pool.gpus) 0 }}
{{- $_ := set $requests "nvidia.com/gpu" (int $pool.gpus) }}
{{- $_ := set $limits "nvidia.com/gpu" (int $pool.gpus) }}
{{- end }}
resources:
  requests:
    {{- toYaml $requests | nindent 4 }}
  limits:
    {{- toYaml $limits | nindent 4 }}
{{- end }}

{{- define "splitserve.pool.probes" -}}
{{- $p := (index .ctx.Values .role).probes }}
startupProbe:
  httpGet:
    path: /health
    port: http
  periodSeconds: {{ $p.startup.periodSeconds }}
  failureThreshold: {{ $p.startup.failureThreshold }}
  timeoutSeconds: {{ $p.startup.timeoutSeconds }}
readinessProbe:
  httpGet:
    path: /health
    port: http
  periodSeconds: {{ $p.readiness.periodSeconds }}
  failureThreshold: {{ $p.readiness.failureThreshold }}
  timeoutSeconds: {{ $p.readiness.timeoutSeconds }}
livenessProbe:
  httpGet:
    path: /live
    port: http
  periodSeconds: {{ $p.liveness.periodSeconds }}
  failureThreshold: {{ $p.liveness.failureThreshold }}
  timeoutSeconds: {{ $p.liveness.timeoutSeconds }}
{{- end }}

{{/* The pool's Deployment. With KEDA on it has no replicas field, so helm upgrades never fight the autoscaler. */}}
{{- define "splitserve.pool.deployment" -}}
{{- $ctx := .ctx }}
{{- $pool := index $ctx.Values .role }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "splitserve.componentName" . }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "splitserve.labels" . | trim | nindent 4 }}
spec:
  {{- if not $pool.autoscaling.enabled }}
  replicas: {{ $pool.replicas }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "splitserve.selectorLabels" . | trim | nindent 6 }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 1
      maxUnavailable: 0
  template:
    metadata:
      labels:
        {{- include "splitserve.labels" . | trim | nindent 8 }}
        {{- with $pool.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $pool.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      automountServiceAccountToken: false
      enableServiceLinks: false
      terminationGracePeriodSeconds: {{ include "splitserve.pool.terminationGracePeriodSeconds" . }}
      {{- with $pool.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      {{- with include "splitserve.imagePullSecrets" $ctx | trim }}
      {{- . | nindent 6 }}
      {{- end }}
      {{- include "splitserve.podSecurityContext" $ctx | trim | nindent 6 }}
      {{- with $pool.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $pool.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $pool.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $pool.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with include "splitserve.model.initContainers" (dict "ctx" $ctx "allowPatterns" "") | trim }}
      initContainers:
        {{- . | nindent 8 }}
      {{- end }}
      containers:
        - name: engine
          image: {{ include "splitserve.image" $ctx }}
          imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
          args:
            {{- include "splitserve.pool.args" . | trim | nindent 12 }}
          ports:
            - name: grpc
              containerPort: {{ $ctx.Values.podPorts.grpc }}
              protocol: TCP
            - name: http
              containerPort: {{ $ctx.Values.podPorts.http }}
              protocol: TCP
          env:
            {{- include "splitserve.downwardEnv" $ctx | trim | nindent 12 }}
            {{- with $pool.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- include "splitserve.pool.resources" . | trim | nindent 10 }}
          {{- include "splitserve.pool.probes" . | trim | nindent 10 }}
          lifecycle:
            preStop:
              sleep:
                seconds: {{ $pool.preStopSleepSeconds }}
          {{- include "splitserve.containerSecurityContext" $ctx | trim | nindent 10 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            - name: shm
              mountPath: /dev/shm
            {{- with include "splitserve.model.volumeMounts" $ctx | trim }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- with include "splitserve.grpcTLS.volumeMount" $ctx | trim }}
            {{- . | nindent 12 }}
            {{- end }}
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: {{ $pool.tmpSizeLimit }}
        - name: shm
          emptyDir:
            medium: Memory
            sizeLimit: {{ $pool.shmSizeLimit }}
        {{- with include "splitserve.model.volumes" $ctx | trim }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- with include "splitserve.grpcTLS.volume" $ctx | trim }}
        {{- . | nindent 8 }}
        {{- end }}
{{- end }}
