{{/*
Impossible value combinations, refused with a message before anything is
rendered (values.schema.json already checked keys and types). Included once,
from validate.yaml.
*/}}
{{- define "splitserve.validate" -}}
{{- $v := .Values }}
{{- if and $v.router.tls.enabled (not $v.router.tls.secretName) }}
{{- fail "router.tls.enabled=true needs router.tls.secretName: a kubernetes.io/tls Secret with tls.crt and tls.key" }}
{{- end }}
{{- if and $v.router.tls.enabled $v.router.httpRoute.enabled }}
{{- fail "router.tls with router.httpRoute needs a BackendTLSPolicy this chart does not make: terminate TLS at the Gateway, or use router.ingress" }}
{{- end }}
{{- if and $v.grpcTLS.enabled (not $v.grpcTLS.secretName) }}
{{- fail "grpcTLS.enabled=true needs grpcTLS.secretName: a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt" }}
{{- end }}
{{- if and $v.unified.enabled (or $v.prefill.enabled $v.decode.enabled) }}
{{- fail "unified.enabled=true cannot be combined with the prefill/decode pools: set prefill.enabled=false and decode.enabled=false (as values-unified.yaml does), or disable unified" }}
{{- end }}
{{- if ne $v.prefill.enabled $v.decode.enabled }}
{{- fail "prefill and decode pools run together: enable both, or neither and use unified.enabled=true" }}
{{- end }}
{{- if not (or $v.prefill.enabled $v.unified.enabled) }}
{{- fail "no engine pool enabled: enable prefill and decode, or unified" }}
{{- end }}
{{- if and $v.prefill.enabled (ne (int $v.prefill.engine.blockSize) (int $v.decode.engine.blockSize)) }}
{{- fail (printf "prefill.engine.blockSize (%v) and decode.engine.blockSize (%v) must match: KV blocks move between them" $v.prefill.engine.blockSize $v.decode.engine.blockSize) }}
{{- end }}
{{- range $role := include "splitserve.enabledPools" . | fromJsonArray }}
{{- $a := (index $v $role).autoscaling }}
{{- if $a.enabled }}
{{- if gt (int $a.minReplicas) (int $a.maxReplicas) }}
{{- fail (printf "%s.autoscaling.minReplicas (%v) is greater than %s.autoscaling.maxReplicas (%v)" $role $a.minReplicas $role $a.maxReplicas) }}
{{- end }}
{{- if and (not (kindIs "invalid" $a.idleReplicaCount)) (ge (int $a.idleReplicaCount) (int $a.minReplicas)) }}
{{- fail (printf "%s.autoscaling.idleReplicaCount (%v) must be below minReplicas (%v): KEDA scales to it only when idle" $role $a.idleReplicaCount $a.minReplicas) }}
{{- end }}
{{- if and (eq $a.trigger "external") (eq (int $v.router.scalerPort) 0) }}
{{- fail (printf "%s.autoscaling.trigger=external needs the router's scaler: set router.scalerPort (e.g. 9090) or use trigger prometheus" $role) }}
{{- end }}
{{- end }}
{{- end }}
{{- $m := $v.model }}
{{- if and (eq $m.source "hf") (not $m.hf.repo) }}
{{- fail "model.source=hf needs model.hf.repo (e.g. meta-llama/Llama-3.1-8B-Instruct)" }}
{{- end }}
{{- if and (eq $m.source "pvc") (not $m.pvc.claimName) }}
{{- fail "model.source=pvc needs model.pvc.claimName" }}
{{- end }}
{{- if and (eq $m.source "hostPath") (not $m.hostPath.path) }}
{{- fail "model.source=hostPath needs model.hostPath.path" }}
{{- end }}
{{- if and (ne $m.source "image") (not (hasPrefix (printf "%s/" (trimSuffix "/" $m.mountPath)) $m.path)) }}
{{- fail (printf "model.path (%s) must lie under model.mountPath (%s) for source %s" $m.path $m.mountPath $m.source) }}
{{- end }}
{{- if eq $v.router.discovery "static" }}
{{- range $role := include "splitserve.enabledPools" . | fromJsonArray }}
{{- if not (index $v.router.static $role) }}
{{- fail (printf "router.discovery=static needs router.static.%s (HOST:PORT list)" $role) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and $v.router.ingress.enabled $v.router.httpRoute.enabled }}
{{- fail "router.ingress and router.httpRoute are alternatives: enable one" }}
{{- end }}
{{- $kv := $v.networkPolicy.kvPortRange }}
{{- if and (gt (int $kv.start) 0) (lt (int $kv.end) (int $kv.start)) }}
{{- fail (printf "networkPolicy.kvPortRange: end (%v) must be >= start (%v)" $kv.end $kv.start) }}
{{- end }}
{{- $_ := include "splitserve.image" . }}
{{- end }}
