{{/*
Checks values.schema.json cannot express (it cannot compare one value with
another). Each failure names the value to fix. Included by rayservice.yaml.
*/}}
{{- define "supernet-router.validate" -}}
{{- $v := .Values }}

{{- /* the checkpoint source */ -}}
{{- $source := $v.checkpoint.source }}
{{- if not $source }}
{{- fail "checkpoint.source is missing: set it to tiny, huggingface, url or existing" }}
{{- end }}
{{- if not (has $source (list "tiny" "huggingface" "url" "existing")) }}
{{- fail (printf "checkpoint.source %q is not one of tiny, huggingface, url, existing" $source) }}
{{- end }}
{{- if and (eq $source "huggingface") (not $v.checkpoint.huggingface.repo) }}
{{- fail "checkpoint.huggingface.repo is missing: checkpoint.source is huggingface, so name the repository (owner/name)" }}
{{- end }}
{{- if and (eq $source "url") (not (regexMatch "^(https?|s3)://" (toString $v.checkpoint.url.location))) }}
{{- fail (printf "checkpoint.url.location %q is not an http://, https:// or s3:// URL: checkpoint.source is url, so give the checkpoint's location" (toString $v.checkpoint.url.location)) }}
{{- end }}
{{- if and (eq $source "existing") (ne $v.checkpoint.storage.kind "persistentVolumeClaim") }}
{{- fail "checkpoint.storage.kind must be persistentVolumeClaim when checkpoint.source is existing (an ephemeral volume starts empty)" }}
{{- end }}
{{- $mount := trimSuffix "/" $v.checkpoint.mountPath }}
{{- with $v.app.model.checkpoint }}
{{- if not (hasPrefix (printf "%s/" $mount) (toString .)) }}
{{- fail (printf "app.model.checkpoint %q is not under checkpoint.mountPath %q: leave it null to use %s/%s" (toString .) $mount $mount $v.checkpoint.subPath) }}
{{- end }}
{{- end }}

{{- /* presets */ -}}
{{- $names := list }}
{{- range $i, $p := $v.app.presets }}
{{- if has $p.name $names }}
{{- fail (printf "app.presets[%d].name %q is repeated: preset names must be unique" $i $p.name) }}
{{- end }}
{{- $names = append $names $p.name }}
{{- if eq $source "tiny" }}
{{- $code := toString $p.placement }}
{{- if and (regexMatch "^[ASGKasgk]+$" $code) (ne (len $code) (int $v.checkpoint.tiny.layers)) }}
{{- fail (printf "app.presets[%d].placement %q has %d layers but checkpoint.tiny.layers is %d: give one mixer letter per layer" $i $code (len $code) (int $v.checkpoint.tiny.layers)) }}
{{- end }}
{{- end }}
{{- end }}
{{- with $v.app.routing.default_preset }}
{{- if not (has . $names) }}
{{- fail (printf "app.routing.default_preset %q is not one of app.presets' names (%s)" . (join ", " $names | default "none configured")) }}
{{- end }}
{{- end }}
{{- $policy := toString $v.app.routing.policy }}
{{- if hasPrefix "fixed:" $policy }}
{{- if not (has (trimPrefix "fixed:" $policy) $names) }}
{{- fail (printf "app.routing.policy %q names no preset of app.presets (%s)" $policy (join ", " $names | default "none configured")) }}
{{- end }}
{{- end }}

{{- /* tables */ -}}
{{- with $v.app.tables.acceptance }}
{{- $dir := "/etc/supernet-router/tables/" }}
{{- if and (hasPrefix $dir (toString .)) (not (hasKey ($v.tables | default dict) (trimPrefix $dir (toString .)))) }}
{{- fail (printf "app.tables.acceptance is %s but tables has no %q: add it (--set-file 'tables.%s=FILE')" . (trimPrefix $dir (toString .)) (trimPrefix $dir (toString .) | replace "." "\\.")) }}
{{- end }}
{{- end }}
{{- with $v.app.tables.speed }}
{{- $dir := "/etc/supernet-router/tables/" }}
{{- if hasPrefix $dir (toString .) }}
{{- if not (hasKey ($v.tables | default dict) (trimPrefix $dir (toString .))) }}
{{- fail (printf "app.tables.speed is %s but tables has no %q: add it (--set-file 'tables.%s=FILE')" . (trimPrefix $dir (toString .)) (trimPrefix $dir (toString .) | replace "." "\\.")) }}
{{- end }}
{{- end }}
{{- range $i, $p := $v.app.presets }}
{{- if kindIs "invalid" $p.quality }}
{{- fail (printf "app.presets[%d].quality is missing: with app.tables.speed set, routing by budget needs every preset's predicted quality" $i) }}
{{- end }}
{{- end }}
{{- end }}

{{- /* replicas and GPUs */ -}}
{{- $w := $v.workers }}
{{- range $key := list "replicas" "minReplicas" "maxReplicas" "gpusPerPod" }}
{{- if lt (int (index $w $key)) 0 }}
{{- fail (printf "workers.%s is %d: it must not be negative" $key (int (index $w $key))) }}
{{- end }}
{{- end }}
{{- if gt (int $w.minReplicas) (int $w.maxReplicas) }}
{{- fail (printf "workers.minReplicas (%d) is more than workers.maxReplicas (%d)" (int $w.minReplicas) (int $w.maxReplicas)) }}
{{- end }}
{{- if or (lt (int $w.replicas) (int $w.minReplicas)) (gt (int $w.replicas) (int $w.maxReplicas)) }}
{{- fail (printf "workers.replicas (%d) is outside workers.minReplicas..workers.maxReplicas (%d..%d)" (int $w.replicas) (int $w.minReplicas) (int $w.maxReplicas)) }}
{{- end }}
{{- if gt (float64 $v.app.worker.num_gpus) (float64 $w.gpusPerPod) }}
{{- fail (printf "app.worker.num_gpus (%v) is more than workers.gpusPerPod (%v): no worker pod could hold a replica" $v.app.worker.num_gpus $w.gpusPerPod) }}
{{- end }}
{{- if and (eq (int $w.gpusPerPod) 0) (eq (toString $v.app.model.device) "cuda") }}
{{- fail "app.model.device is cuda but workers.gpusPerPod is 0: give the workers GPUs or set the device to cpu or auto" }}
{{- end }}
{{- /* API keys */ -}}
{{- if and $v.apiKeys.create $v.apiKeys.existingSecret }}
{{- fail "apiKeys.create and apiKeys.existingSecret are both set: use one" }}
{{- end }}
{{- if and $v.apiKeys.create (not $v.apiKeys.keys) }}
{{- fail "apiKeys.keys is empty but apiKeys.create is true: give at least one key (or use apiKeys.existingSecret)" }}
{{- end }}
{{- range $k := $v.apiKeys.keys }}
{{- if contains "," (toString $k) }}
{{- fail "apiKeys.keys: a key contains a comma, which separates keys in the environment variable" }}
{{- end }}
{{- end }}

{{- /* traffic */ -}}
{{- if and $v.httpRoute.enabled (not $v.httpRoute.parentRefs) }}
{{- fail "httpRoute.parentRefs is empty: name the Gateway the route attaches to" }}
{{- end }}
{{- end }}
