{{/*
The model volume, its mount and (source hf) the download init container.
Every pod that needs the model (engine pods, the router for the tokenizer)
includes these three; source `image` needs none of them.
*/}}

{{- define "splitserve.model.volumes" -}}
{{- $m := .Values.model }}
{{- if eq $m.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ $m.pvc.claimName }}
    readOnly: true
{{- else if eq $m.source "hostPath" }}
- name: model
  hostPath:
    path: {{ $m.hostPath.path }}
    type: Directory
{{- else if eq $m.source "hf" }}
- name: model
  emptyDir:
    sizeLimit: {{ $m.hf.cacheSizeLimit }}
{{- end }}
{{- end }}

{{- define "splitserve.model.volumeMounts" -}}
{{- $m := .Values.model }}
{{- if ne $m.source "image" }}
- name: model
  mountPath: {{ $m.mountPath }}
  readOnly: {{ ne $m.source "hf" }}
  {{- if and (eq $m.source "pvc") $m.pvc.subPath }}
  subPath: {{ $m.pvc.subPath }}
  {{- end }}
{{- end }}
{{- end }}

{{/*
Init container downloading the Hugging Face repo into the model volume.
Call with (dict "ctx" $ "allowPatterns" "...") ; the router passes the
tokenizer/config patterns only, engine pods download everything.
*/}}
{{- define "splitserve.model.initContainers" -}}
{{- $ctx := .ctx }}
{{- $m := $ctx.Values.model }}
{{- if eq $m.source "hf" }}
- name: download-model
  image: {{ include "splitserve.image" $ctx }}
  imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
  command:
    - python3
    - -c
    - |
      import os
      from huggingface_hub import snapshot_download
      patterns = os.environ.get("HF_ALLOW_PATTERNS") or None
      snapshot_download(repo_id=os.environ["HF_REPO"], revision=os.environ["HF_REVISION"],
                        local_dir=os.environ["MODEL_DIR"],
                        allow_patterns=patterns.split(",") if patterns else None)
  env:
    - name: HF_REPO
      value: {{ $m.hf.repo | quote }}
    - name: HF_REVISION
      value: {{ $m.hf.revision | quote }}
    - name: MODEL_DIR
      value: {{ $m.path | quote }}
    - name: HF_ALLOW_PATTERNS
      value: {{ .allowPatterns | default "" | quote }}
    - name: HF_HOME
      value: /tmp/hf
    - name: HOME
      value: /tmp
    {{- if $m.hf.tokenSecret.name }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ $m.hf.tokenSecret.name }}
          key: {{ $m.hf.tokenSecret.key }}
    {{- end }}
  resources:
    {{- toYaml $m.hf.resources | nindent 4 }}
  {{- include "splitserve.containerSecurityContext" $ctx | trim | nindent 2 }}
  volumeMounts:
    - name: model
      mountPath: {{ $m.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end }}
