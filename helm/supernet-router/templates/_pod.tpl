{{/*
Pieces shared by the head and worker pod templates. Each takes a dict:
  root: the top-level context, group: .Values.head or .Values.workers.
*/}}

{{/* The checkpoint fill: runs before Ray starts in every Ray pod. */}}
{{- define "supernet-router.initContainer" -}}
{{- $root := .root -}}
{{- $c := $root.Values.checkpoint -}}
- name: fill-checkpoint
  image: {{ default (include "supernet-router.image" $root) $c.initContainer.image | quote }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  command: ["/bin/sh", "/etc/supernet-router/config/fill-checkpoint.sh"]
  env:
    - name: SOURCE
      value: {{ $c.source | quote }}
    - name: DEST
      value: {{ include "supernet-router.checkpointPath" $root | quote }}
    - name: SOURCE_ID
      value: {{ include "supernet-router.checkpointSourceId" $root | quote }}
    - name: LOCK_STALE_MINUTES
      value: {{ $c.lockStaleMinutes | quote }}
    - name: HOME
      value: /tmp
    - name: HF_HOME
      value: /tmp/huggingface
    {{- if eq $c.source "tiny" }}
    - name: TINY_LAYERS
      value: {{ $c.tiny.layers | quote }}
    - name: TINY_SEED
      value: {{ $c.tiny.seed | quote }}
    - name: TINY_WINDOW
      value: {{ $c.tiny.window | quote }}
    {{- else if eq $c.source "huggingface" }}
    - name: HF_REPO
      value: {{ $c.huggingface.repo | quote }}
    - name: HF_REVISION
      value: {{ default "main" $c.huggingface.revision | quote }}
    - name: HF_ALLOW_PATTERNS
      value: {{ join "," $c.huggingface.allowPatterns | quote }}
    {{- with $c.huggingface.tokenSecret.name }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ . }}
          key: {{ $c.huggingface.tokenSecret.key }}
    {{- end }}
    {{- else if eq $c.source "url" }}
    - name: URL
      value: {{ $c.url.location | quote }}
    {{- end }}
    {{- with $c.initContainer.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- if and (eq $c.source "url") $c.url.credentialsSecret }}
  envFrom:
    - secretRef:
        name: {{ $c.url.credentialsSecret }}
  {{- end }}
  resources:
    {{- toYaml $c.initContainer.resources | nindent 4 }}
  securityContext:
    {{- toYaml $root.Values.containerSecurityContext | nindent 4 }}
  volumeMounts:
    - name: checkpoint
      mountPath: {{ $c.mountPath }}
    - name: config
      mountPath: /etc/supernet-router/config
      readOnly: true
    - name: tmp
      mountPath: /tmp
{{- end }}

{{/* Environment of the Ray containers (head and workers). */}}
{{- define "supernet-router.rayEnv" -}}
{{- $root := .root -}}
- name: HOME
  value: /tmp
- name: SUPERNET_ROUTER_HOME
  value: /tmp/supernet-router
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRITON_CACHE_DIR
  value: /tmp/triton
{{- with include "supernet-router.apiKeysSecretName" $root }}
- name: {{ $root.Values.app.ingress.api_keys_env }}
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $root.Values.apiKeys.secretKey }}
{{- end }}
{{- with .group.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "supernet-router.rayVolumeMounts" -}}
- name: checkpoint
  mountPath: {{ .root.Values.checkpoint.mountPath }}
  readOnly: true
- name: config
  mountPath: /etc/supernet-router/config
  readOnly: true
- name: tables
  mountPath: /etc/supernet-router/tables
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: dshm
  mountPath: /dev/shm
{{- end }}

{{- define "supernet-router.volumes" -}}
{{- $root := .root -}}
{{- $c := $root.Values.checkpoint -}}
{{- $fullname := include "supernet-router.fullname" $root -}}
- name: checkpoint
{{- if eq $c.storage.kind "ephemeral" }}
  ephemeral:
    volumeClaimTemplate:
      metadata:
        labels:
          {{- include "supernet-router.selectorLabels" $root | nindent 10 }}
      spec:
        accessModes: ["ReadWriteOnce"]
        {{- with $c.storage.storageClassName }}
        storageClassName: {{ . }}
        {{- end }}
        resources:
          requests:
            storage: {{ $c.storage.size }}
{{- else }}
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-checkpoint" $fullname) $c.storage.existingClaim }}
{{- end }}
- name: config
  configMap:
    name: {{ $fullname }}-config
- name: tables
  configMap:
    name: {{ $fullname }}-tables
- name: tmp
  emptyDir:
    sizeLimit: {{ .group.tmpSizeLimit }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .group.shmSizeLimit }}
{{- end }}

{{/* Pod template metadata: labels select pods for the PodMonitor and the NetworkPolicy. */}}
{{- define "supernet-router.podMetadata" -}}
{{- $root := .root -}}
labels:
  {{- include "supernet-router.labels" $root | nindent 2 }}
  app.kubernetes.io/component: {{ .component }}
  {{- with .group.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
annotations:
  checksum/tables: {{ include (print $root.Template.BasePath "/tables-configmap.yaml") $root | sha256sum }}
  checksum/fill-checkpoint: {{ $root.Files.Get "files/fill-checkpoint.sh" | sha256sum }}
  {{- with .group.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{- define "supernet-router.scheduling" -}}
{{- with .group.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
