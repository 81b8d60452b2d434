{{/*
The router's names and arguments (runtime contract: `splitserve router ...`).
*/}}

{{- define "splitserve.router.name" -}}
{{- include "splitserve.componentName" (dict "ctx" . "role" "router") }}
{{- end }}

{{- define "splitserve.router.serviceAccountName" -}}
{{- default (include "splitserve.router.name" .) .Values.router.serviceAccount.name }}
{{- end }}

{{- define "splitserve.router.terminationGracePeriodSeconds" -}}
{{- $r := .Values.router }}
{{- add (int $r.preStopSleepSeconds) ($r.shutdownGraceSeconds | ceil | int) (int $r.drainMarginSeconds) }}
{{- end }}

{{/* Discovery flags: Service names (kubernetes), their DNS HOST:PORT (dns), or address lists (static). */}}
{{- define "splitserve.router.discoveryArgs" -}}
{{- $r := .Values.router }}
- --discovery
- {{ $r.discovery }}
{{- if eq $r.discovery "static" }}
{{- range $role := list "prefill" "decode" "unified" }}
{{- with index $r.static $role }}
- --{{ $role }}
- {{ join "," . | quote }}
{{- end }}
{{- end }}
{{- else }}
{{- if eq $r.discovery "kubernetes" }}
- --namespace
- {{ .Release.Namespace }}
- --grpc-port-name
- grpc
{{- end }}
{{- range $role := include "splitserve.enabledPools" . | fromJsonArray }}
{{- $svc := include "splitserve.componentName" (dict "ctx" $ "role" $role) }}
- --{{ $role }}-service
{{- if eq $r.discovery "dns" }}
- {{ printf "%s.%s.svc.cluster.local:%v" $svc $.Release.Namespace $.Values.podPorts.grpc | quote }}
{{- else }}
- {{ $svc }}
{{- end }}
{{- end }}
- --reconcile-seconds
- {{ $r.reconcileSeconds | quote }}
{{- end }}
{{- end }}

{{/* The router's --host: bindAddress plus loopback (kubectl port-forward dials 127.0.0.1 inside the pod), unless bindAddress already covers every interface. */}}
{{- define "splitserve.router.host" -}}
{{- if has .Values.bindAddress (list "0.0.0.0" "::") }}{{ .Values.bindAddress }}{{ else }}{{ .Values.bindAddress }},127.0.0.1{{ end }}
{{- end }}

{{/* The router API's URL scheme. */}}
{{- define "splitserve.router.scheme" -}}
{{- if .Values.router.tls.enabled }}https{{ else }}http{{ end }}
{{- end }}

{{- define "splitserve.router.args" -}}
{{- $r := .Values.router }}
- router
- --model
- {{ .Values.model.path | quote }}
- --served-model-name
- {{ include "splitserve.servedModelName" . | quote }}
- --host
- {{ include "splitserve.router.host" . | quote }}
- --port
- {{ $r.port | quote }}
- --policy
- {{ $r.policy }}
- --pd-threshold-tokens
- {{ $r.pdThresholdTokens | quote }}
- --block-size
- {{ (index .Values (first (include "splitserve.enabledPools" . | fromJsonArray))).engine.blockSize | quote }}
{{ include "splitserve.router.discoveryArgs" . | trim }}
- --scaler-port
- {{ $r.scalerPort | quote }}
- --max-queued-requests
- {{ $r.maxQueuedRequests | quote }}
- --queue-timeout-seconds
- {{ $r.queueTimeoutSeconds | quote }}
- --shutdown-grace-seconds
- {{ $r.shutdownGraceSeconds | quote }}
{{- with include "splitserve.grpcTLS.args" . | trim }}
{{ . }}
{{- end }}
{{- if $r.tls.enabled }}
- --ssl-keyfile
- /etc/splitserve/router-tls/tls.key
- --ssl-certfile
- /etc/splitserve/router-tls/tls.crt
{{- end }}
{{- range $r.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}
