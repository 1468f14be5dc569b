{{/*
Names, labels and the values the templates share.
*/}}

{{- define "supernet-router.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name. RayService names feed KubeRay's generated names
(<name>-raycluster-xxxxx-head-svc, ...), so keep it short: 40 characters.
*/}}
{{- define "supernet-router.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "supernet-router.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "supernet-router.selectorLabels" -}}
app.kubernetes.io/name: {{ include "supernet-router.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "supernet-router.labels" -}}
helm.sh/chart: {{ include "supernet-router.chart" . }}
{{ include "supernet-router.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: supernet-router
{{- end }}

{{- define "supernet-router.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* KubeRay's serve Service, defined through spec.serveService: the router Service. */}}
{{- define "supernet-router.serveServiceName" -}}
{{- printf "%s-serve-svc" (include "supernet-router.fullname" .) }}
{{- end }}

{{- define "supernet-router.checkpointPath" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.checkpoint.mountPath) .Values.checkpoint.subPath }}
{{- end }}

{{- define "supernet-router.apiKeysSecretName" -}}
{{- if .Values.apiKeys.existingSecret }}
{{- .Values.apiKeys.existingSecret }}
{{- else if .Values.apiKeys.create }}
{{- printf "%s-api-keys" (include "supernet-router.fullname" .) }}
{{- end }}
{{- end }}

{{/*
The application's arguments: .Values.app with the checkpoint path filled in.
The same mapping `supernet-router serve --config` reads (AppConfig).
*/}}
{{- define "supernet-router.appArgs" -}}
{{- $args := deepCopy .Values.app }}
{{- $model := default dict $args.model }}
{{- if not $model.checkpoint }}
{{- $_ := set $model "checkpoint" (include "supernet-router.checkpointPath" .) }}
{{- end }}
{{- $_ := set $args "model" $model }}
{{- toYaml $args }}
{{- end }}

{{/* The Ray Serve config (serveConfigV2): one application, built by router.app:app_builder. */}}
{{- define "supernet-router.serveConfig" -}}
{{- $app := dict
      "name" .Values.serve.applicationName
      "import_path" "router.app:app_builder"
      "route_prefix" .Values.serve.routePrefix
      "args" (include "supernet-router.appArgs" . | fromYaml) }}
{{- $config := dict
      "proxy_location" .Values.serve.proxyLocation
      "http_options" (dict "host" "0.0.0.0" "port" (int .Values.serve.port))
      "applications" (list $app) }}
{{- toYaml $config }}
{{- end }}

{{/* What the checkpoint volume holds, written to its marker file: a change refills it. */}}
{{- define "supernet-router.checkpointSourceId" -}}
{{- $c := .Values.checkpoint }}
{{- if eq $c.source "tiny" }}
{{- printf "tiny:layers=%v,seed=%v,window=%v" (int $c.tiny.layers) (int $c.tiny.seed) (int $c.tiny.window) }}
{{- else if eq $c.source "huggingface" }}
{{- printf "huggingface:%s@%s:%s" $c.huggingface.repo (default "main" $c.huggingface.revision) (join "," $c.huggingface.allowPatterns) }}
{{- else if eq $c.source "url" }}
{{- printf "url:%s" $c.url.location }}
{{- else }}
{{- print "existing" }}
{{- end }}
{{- end }}
