{{- define "gptoss.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "gptoss.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "gptoss.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gptoss.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "gptoss.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "gptoss.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The Ray pods (head and workers): what the Service, PDBs, NetworkPolicy and PodMonitor select. */}}
{{- define "gptoss.raySelectorLabels" -}}
{{ include "gptoss.selectorLabels" . }}
app.kubernetes.io/component: ray
{{- end -}}

{{- define "gptoss.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "gptoss.modelClaim" -}}
{{- default (printf "%s-models" (include "gptoss.fullname" .)) .Values.model.pvc.existingClaim -}}
{{- end -}}

{{/* Is a pool's model an HF id (not builtin:<preset>, not a path)? */}}
{{- define "gptoss.isHfId" -}}
{{- if not (or (hasPrefix "builtin:" .) (hasPrefix "/" .) (hasPrefix "~" .) (hasPrefix "./" .) (hasPrefix "../" .)) -}}true{{- end -}}
{{- end -}}

{{/* The distinct HF ids the pools serve (JSON list). */}}
{{- define "gptoss.hfModels" -}}
{{- $models := list -}}
{{- range $name, $pool := .Values.serve.pools -}}
{{- if include "gptoss.isHfId" $pool.model -}}
{{- $models = append $models $pool.model -}}
{{- end -}}
{{- end -}}
{{- $models | uniq | sortAlpha | toJson -}}
{{- end -}}

{{/*
Cross-field checks the values schema cannot express; each message names the value.
*/}}
{{- define "gptoss.validate" -}}
{{- $v := .Values -}}
{{- $served := dict -}}
{{- range $name, $pool := $v.serve.pools -}}
{{- if not (hasKey $v.workerGroups $name) -}}
{{- fail (printf "serve.pools.%s has no worker group: add workerGroups.%s" $name $name) -}}
{{- end -}}
{{- $wg := index $v.workerGroups $name -}}
{{- $gpus := int (default 0 $wg.gpusPerReplica) -}}
{{- if and $wg.gpu (lt $gpus 1) -}}
{{- fail (printf "workerGroups.%s.gpusPerReplica is %d but workerGroups.%s.gpu is true: a GPU pool needs at least one GPU per replica" $name $gpus $name) -}}
{{- end -}}
{{- $engine := default (dict) $pool.engine_args -}}
{{- $tp := int (default 1 (get $engine "tensor_parallel_size")) -}}
{{- if gt $tp (max $gpus 1) -}}
{{- fail (printf "serve.pools.%s.engine_args.tensor_parallel_size is %d but workerGroups.%s.gpusPerReplica is %d: tensor parallelism needs one GPU per shard" $name $tp $name $gpus) -}}
{{- end -}}
{{- $actor := default (dict) $pool.ray_actor_options -}}
{{- if and (hasKey $actor "num_gpus") (ne (float64 (get $actor "num_gpus")) (float64 $gpus)) -}}
{{- fail (printf "serve.pools.%s.ray_actor_options.num_gpus (%v) differs from workerGroups.%s.gpusPerReplica (%d): leave num_gpus out, the chart sets it" $name (get $actor "num_gpus") $name $gpus) -}}
{{- end -}}
{{- if gt (int $wg.minReplicas) (int $wg.maxReplicas) -}}
{{- fail (printf "workerGroups.%s.minReplicas (%d) is above workerGroups.%s.maxReplicas (%d)" $name (int $wg.minReplicas) $name (int $wg.maxReplicas)) -}}
{{- end -}}
{{- $want := int (default 1 $pool.replicas) -}}
{{- if $pool.autoscaling -}}
{{- $want = int (default 1 (get $pool.autoscaling "max_replicas")) -}}
{{- end -}}
{{- if gt $want (int $wg.maxReplicas) -}}
{{- fail (printf "serve.pools.%s wants up to %d replicas but workerGroups.%s.maxReplicas is %d (one replica per worker pod)" $name $want $name (int $wg.maxReplicas)) -}}
{{- end -}}
{{- range $effort := $pool.efforts -}}
{{- $_ := set $served $effort $name -}}
{{- end -}}
{{- end -}}
{{- range $name, $_ := $v.workerGroups -}}
{{- if not (hasKey $v.serve.pools $name) -}}
{{- fail (printf "workerGroups.%s has no pool: serve.pools has no pool named %s" $name $name) -}}
{{- end -}}
{{- end -}}
{{- range $effort := list "low" "medium" "high" -}}
{{- if not (hasKey $served $effort) -}}
{{- fail (printf "serve.pools: no pool serves effort %q (every effort low/medium/high needs a pool in serve.pools.<name>.efforts)" $effort) -}}
{{- end -}}
{{- end -}}
{{- if and $v.serve.auth $v.serve.auth.api_keys_file (not $v.apiKeys.existingSecret) -}}
{{- fail (printf "serve.auth.api_keys_file is %s but apiKeys.existingSecret is empty: name the Secret holding the keys" $v.serve.auth.api_keys_file) -}}
{{- end -}}
{{- if and (eq $v.model.source "pvc") (eq (include "gptoss.hfModels" .) "[]") -}}
{{- fail "model.source is pvc but no pool in serve.pools has a Hugging Face model id to download" -}}
{{- end -}}
{{- if and $v.httpRoute.enabled (not $v.httpRoute.parentRefs) -}}
{{- fail "httpRoute.enabled is true but httpRoute.parentRefs is empty: name the Gateway" -}}
{{- end -}}
{{- end -}}

{{/*
The serving config as the RayService runs it: values.serve plus, per pool, its worker group's Ray resource and
GPU count, the model's path on the PVC, and the mounted API keys file.
*/}}
{{- define "gptoss.serveConfig" -}}
{{- $v := .Values -}}
{{- $serve := deepCopy $v.serve -}}
{{- range $name, $pool := $serve.pools -}}
{{- $wg := index $v.workerGroups $name -}}
{{- $actor := deepCopy (default (dict) $pool.ray_actor_options) -}}
{{- $resources := deepCopy (default (dict) (get $actor "resources")) -}}
{{- $_ := set $resources (printf "gptoss_pool_%s" $name) 1 -}}
{{- $_ = set $actor "resources" $resources -}}
{{- $_ = set $actor "num_gpus" (int (default 0 $wg.gpusPerReplica)) -}}
{{- $_ = set $pool "ray_actor_options" $actor -}}
{{- if and (eq $v.model.source "pvc") (include "gptoss.isHfId" $pool.model) -}}
{{- $_ = set $pool "model" (printf "%s/%s" $v.model.pvc.mountPath $pool.model) -}}
{{- end -}}
{{- end -}}
{{- if $v.apiKeys.existingSecret -}}
{{- $auth := deepCopy (default (dict) $serve.auth) -}}
{{- $_ := set $auth "api_keys_file" (printf "%s/%s" $v.apiKeys.mountPath $v.apiKeys.key) -}}
{{- $_ = set $serve "auth" $auth -}}
{{- end -}}
{{- toYaml $serve -}}
{{- end -}}

{{- define "gptoss.serveConfigV2" -}}
{{- $app := dict "name" "gptoss" "route_prefix" "/" "import_path" "gptoss_vllm.serve.app:build_app" "args" (dict "serve" (include "gptoss.serveConfig" . | fromYaml)) -}}
{{- toYaml (dict "applications" (list $app)) -}}
{{- end -}}

{{/*
Termination grace period of one worker group (dict "root" $ "name" poolName): the longest a stream of the pool
can take, max(drain_timeout_s, ceil(max_tokens of the pool's largest effort budget / minDecodeTokensPerSecond)),
plus terminationMarginSeconds. An effort without a budget counts engine_args.max_model_len.
*/}}
{{- define "gptoss.gracePeriod" -}}
{{- $v := .root.Values -}}
{{- $pool := index $v.serve.pools .name -}}
{{- $wg := index $v.workerGroups .name -}}
{{- if $wg.terminationGracePeriodSeconds -}}
{{- int $wg.terminationGracePeriodSeconds -}}
{{- else -}}
{{- $budgets := default (dict) $v.serve.budgets -}}
{{- $engine := default (dict) $pool.engine_args -}}
{{- $tokens := 0.0 -}}
{{- range $effort := $pool.efforts -}}
{{- $t := float64 (default 0 (get $engine "max_model_len")) -}}
{{- if hasKey $budgets $effort -}}
{{- $t = float64 (get (index $budgets $effort) "max_tokens") -}}
{{- end -}}
{{- $tokens = maxf $tokens $t -}}
{{- end -}}
{{- $decode := ceil (divf $tokens $v.minDecodeTokensPerSecond) -}}
{{- $drain := float64 (default 600 $pool.drain_timeout_s) -}}
{{- add (int (ceil (maxf $decode $drain))) (int $v.terminationMarginSeconds) -}}
{{- end -}}
{{- end -}}

{{- define "gptoss.headGracePeriod" -}}
{{- $longest := 0 -}}
{{- range $name, $_ := .Values.serve.pools -}}
{{- $longest = max $longest (int (include "gptoss.gracePeriod" (dict "root" $ "name" $name))) -}}
{{- end -}}
{{- $longest -}}
{{- end -}}

{{/* Env of every Ray container. */}}
{{- define "gptoss.env" -}}
- name: GPTOSS_METRICS_PORT
  value: {{ .Values.metricsPort | quote }}
- name: GPTOSS_METRICS_PORT_COUNT
  value: {{ .Values.metricsPortCount | quote }}
- name: HOME
  value: /home/gptoss
- name: HF_HOME
  value: /var/cache/huggingface
{{- if .Values.model.hfTokenSecret.name }}
- name: HF_TOKEN_PATH
  value: /etc/gptoss/hf-token/{{ .Values.model.hfTokenSecret.key }}
{{- end }}
{{- if eq .Values.model.source "pvc" }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
{{- with .Values.otel }}
{{- if .endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ .protocol | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ .serviceName | quote }}
{{- end }}
{{- range $key, $value := .extraEnv }}
- name: {{ $key }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "gptoss.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "gptoss.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: {{ .Values.securityContext.readOnlyRootFilesystem }}
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Volumes of every Ray pod (dict "root" $ "shm" size "models" bool). */}}
{{- define "gptoss.volumes" -}}
{{- $v := .root.Values -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shm | default "2Gi" }}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
- name: hooks
  configMap:
    name: {{ include "gptoss.fullname" .root }}-hooks
    defaultMode: 0555
{{- if and .models (eq $v.model.source "pvc") }}
- name: models
  persistentVolumeClaim:
    claimName: {{ include "gptoss.modelClaim" .root }}
    readOnly: true
{{- else }}
- name: hf-cache
  emptyDir:
    sizeLimit: {{ $v.model.cacheSizeLimit }}
{{- end }}
{{- if $v.model.hfTokenSecret.name }}
- name: hf-token
  secret:
    secretName: {{ $v.model.hfTokenSecret.name }}
    defaultMode: 0440
{{- end }}
{{- if $v.apiKeys.existingSecret }}
- name: api-keys
  secret:
    secretName: {{ $v.apiKeys.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "gptoss.volumeMounts" -}}
{{- $v := .root.Values -}}
- {name: dshm, mountPath: /dev/shm}
- {name: tmp, mountPath: /tmp}
- {name: home, mountPath: /home/gptoss}
- {name: hooks, mountPath: /etc/gptoss/hooks, readOnly: true}
{{- if and .models (eq $v.model.source "pvc") }}
- {name: models, mountPath: {{ $v.model.pvc.mountPath }}, readOnly: true}
{{- else }}
- {name: hf-cache, mountPath: /var/cache/huggingface}
{{- end }}
{{- if $v.model.hfTokenSecret.name }}
- {name: hf-token, mountPath: /etc/gptoss/hf-token, readOnly: true}
{{- end }}
{{- if $v.apiKeys.existingSecret }}
- {name: api-keys, mountPath: {{ $v.apiKeys.mountPath }}, readOnly: true}
{{- end }}
{{- end -}}
