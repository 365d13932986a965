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
{{- $auth := default (dict) $v.serve.auth -}}
{{- if and (or $v.ingress.enabled $v.httpRoute.enabled) (not $v.apiKeys.existingSecret) (not (get $auth "api_keys_env")) (not $v.apiKeys.allowAnonymous) -}}
{{- fail (printf "%s.enabled is true but apiKeys.existingSecret is empty: an endpoint reachable from outside the cluster needs API keys (name the Secret holding them in apiKeys.existingSecret), or set apiKeys.allowAnonymous: true to serve it without keys" (ternary "ingress" "httpRoute" $v.ingress.enabled)) -}}
{{- end -}}
{{- $store := $v.responseStore -}}
{{- if $v.serve.response_store -}}
{{- fail "serve.response_store is set: set responseStore instead (the chart writes serve.response_store from it, with the Secrets' env and mounts)" -}}
{{- end -}}
{{- if and (eq $store.backend "redis") (not $store.url) -}}
{{- fail "responseStore.backend is redis but responseStore.url is empty: set it to redis://host:6379/0 (or rediss:// for TLS)" -}}
{{- end -}}
{{- if and (eq $store.backend "redis") (not (regexMatch "^rediss?://" $store.url)) -}}
{{- fail (printf "responseStore.url %q is not a redis:// or rediss:// URL" (regexReplaceAll "//[^@/]*@" $store.url "//")) -}}
{{- end -}}
{{- if regexMatch "^rediss?://[^/]*:[^@/]*@" (toString $store.url) -}}
{{- fail "responseStore.url holds a password: put it in a Secret and name it in responseStore.passwordSecret" -}}
{{- end -}}
{{- if and (eq $store.backend "embedded") (gt (int (dig "ingress" "replicas" 1 $v.serve)) 1) -}}
{{- fail "serve.ingress.replicas is above 1 but responseStore.backend is embedded: each ingress replica would keep its own conversations; set responseStore.backend: redis" -}}
{{- end -}}
{{- $ingress := default (dict) $v.serve.ingress -}}
{{- range $pair := list (list "max_body_bytes" "maxBodyBytes") (list "max_header_bytes" "maxHeaderBytes") (list "body_timeout_s" "bodyTimeoutSeconds") -}}
{{- $serveKey := index $pair 0 -}}
{{- $chartKey := index $pair 1 -}}
{{- $chartValue := get $v.ingress $chartKey -}}
{{- if and (hasKey $ingress $serveKey) (ne (toString $chartValue) "") (ne (float64 (get $ingress $serveKey)) (float64 $chartValue)) -}}
{{- fail (printf "serve.ingress.%s (%v) differs from ingress.%s (%v): set ingress.%s only, the chart writes it into both the proxies' env and the serving config" $serveKey (get $ingress $serveKey) $chartKey $chartValue $chartKey) -}}
{{- end -}}
{{- end -}}
{{- if hasKey $ingress "body_shape" -}}
{{- fail "serve.ingress.body_shape is set: set ingress.bodyShape instead, so that every Ray node's HTTP proxy gets the same bounds as the ingress" -}}
{{- end -}}
{{- if and (hasKey $ingress "max_body_bytes") (eq (toString $v.ingress.maxBodyBytes) "") -}}
{{- fail (printf "serve.ingress.max_body_bytes is set (%v) but ingress.maxBodyBytes is empty: set ingress.maxBodyBytes instead, so that every Ray node's HTTP proxy gets the same limit" (get $ingress "max_body_bytes")) -}}
{{- end -}}
{{- if and $v.rayAuth.enabled (semverCompare "<2.52.0-0" $v.rayVersion) -}}
{{- fail (printf "rayAuth.enabled is true but rayVersion is %s: Ray token authentication needs Ray 2.52.0 or later (set rayAuth.enabled: false for an older image)" $v.rayVersion) -}}
{{- end -}}
{{- end -}}

{{/*
A Secret's value the chart generates once: the value already in the cluster (lookup; kept across upgrades), or a
new random one on install. `helm template` (no cluster) makes a new one each time: GitOps setups name their
own Secret instead (rayAuth.existingSecret, monitoring.tokenSecret.name). (dict "root" $ "name" secret "key" key)
*/}}
{{- define "gptoss.generatedSecretValue" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .name -}}
{{- if and $existing $existing.data (hasKey $existing.data .key) -}}
{{- index $existing.data .key -}}
{{- else -}}
{{- randAlphaNum 48 | b64enc -}}
{{- end -}}
{{- end -}}

{{/* The Secret (name, key) holding the Ray auth token: rayAuth.existingSecret or the chart's own. */}}
{{- define "gptoss.rayAuthSecret" -}}
{{- default (printf "%s-ray-auth" (include "gptoss.fullname" .)) .Values.rayAuth.existingSecret -}}
{{- end -}}

{{/* Is the monitoring token wired (monitoring on, or a token Secret named)? */}}
{{- define "gptoss.monitoringToken" -}}
{{- if or .Values.monitoring.enabled .Values.monitoring.tokenSecret.name -}}true{{- end -}}
{{- end -}}

{{- define "gptoss.monitoringTokenSecret" -}}
{{- default (printf "%s-monitoring" (include "gptoss.fullname" .)) .Values.monitoring.tokenSecret.name -}}
{{- end -}}

{{/* Env that turns on Ray token authentication (head, workers, the autoscaler sidecar). */}}
{{- define "gptoss.rayAuthEnv" -}}
{{- if .Values.rayAuth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "gptoss.rayAuthSecret" . }}
      key: auth_token
{{- end }}
{{- end -}}

{{/*
The serving config as the RayService runs it: values.serve plus, per pool, its worker group's Ray resource and
GPU count, the model's path on the PVC, the mounted API keys file, and the proxy gate's bounds (ingress.maxBodyBytes,
maxHeaderBytes, bodyTimeoutSeconds as serve.ingress.max_body_bytes, max_header_bytes, body_timeout_s), which the
proxies get as env, so that both enforce the same limits.
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
{{- /* A tool without a url is this release's server (tools.<tool>). */ -}}
{{- $tools := default (dict) $pool.tools -}}
{{- range $tool := list "python" "browser" -}}
{{- if hasKey $tools $tool -}}
{{- $server := default (dict) (get $tools $tool) -}}
{{- if not $server.url -}}
{{- $chart := index $v.tools $tool -}}
{{- if not $chart.enabled -}}
{{- fail (printf "serve.pools.%s.tools.%s has no url and tools.%s.enabled is false: enable the chart's %s server, or give the url of yours" $name $tool $tool $tool) -}}
{{- end -}}
{{- $_ := set $server "url" (printf "%s-tools-%s:%d" (include "gptoss.fullname" $) $tool (int $chart.port)) -}}
{{- end -}}
{{- $_ := set $tools $tool $server -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $ingress := deepCopy (default (dict) $serve.ingress) -}}
{{- if ne (toString $v.ingress.maxBodyBytes) "" -}}
{{- $_ := set $ingress "max_body_bytes" (int64 $v.ingress.maxBodyBytes) -}}
{{- end -}}
{{- $_ := set $ingress "max_header_bytes" (int64 $v.ingress.maxHeaderBytes) -}}
{{- $_ = set $ingress "body_timeout_s" (float64 $v.ingress.bodyTimeoutSeconds) -}}
{{- $shape := dict -}}
{{- range $chartKey, $serveKey := dict "maxDepth" "max_depth" "maxObjectMembers" "max_object_members" "maxArrayItems" "max_array_items" "maxStringBytes" "max_string_bytes" "maxWordBytes" "max_word_bytes" -}}
{{- $_ := set $shape $serveKey (int64 (get $v.ingress.bodyShape $chartKey)) -}}
{{- end -}}
{{- $_ = set $ingress "body_shape" $shape -}}
{{- /* Behind an Ingress or a Gateway, the connection's peer is the balancer: the client is the last
     x-forwarded-for entry it appends (the failed-authentication limit is per client address). */ -}}
{{- if and (or $v.ingress.enabled $v.httpRoute.enabled) (not (hasKey $ingress "client_address_header")) -}}
{{- $_ = set $ingress "client_address_header" "x-forwarded-for" -}}
{{- end -}}
{{- $_ = set $serve "ingress" $ingress -}}
{{- $store := dict "backend" $v.responseStore.backend "ttl_s" (float64 $v.responseStore.ttlSeconds) "max_responses" (int64 $v.responseStore.maxResponses) -}}
{{- if eq $v.responseStore.backend "redis" -}}
{{- $_ := set $store "url" $v.responseStore.url -}}
{{- if $v.responseStore.tlsCaSecret.name -}}
{{- $_ := set $store "tls_ca_file" (printf "/etc/gptoss/response-store-ca/%s" $v.responseStore.tlsCaSecret.key) -}}
{{- end -}}
{{- end -}}
{{- $_ = set $serve "response_store" $store -}}
{{- if $v.apiKeys.existingSecret -}}
{{- $auth := deepCopy (default (dict) $serve.auth) -}}
{{- $_ := set $auth "api_keys_file" (printf "%s/%s" $v.apiKeys.mountPath $v.apiKeys.key) -}}
{{- $_ = set $serve "auth" $auth -}}
{{- end -}}
{{- toYaml $serve -}}
{{- end -}}

{{/*
The Serve applications: the ingress's ("gptoss", at /) with the config's view, and one per pool
("gptoss-pool-<name>") with the pool's own section, as gptoss_vllm.serve.app.serve_deploy_config writes them.
Ray versions each application by its arguments: a change to one pool restarts that pool's application alone, and
the ingress only when what it reads of a pool changes (ServeConfig.view: efforts, bounds, spillover, drain, cold
start, the floor of replicas, max_model_len and the built-in tools it offers).
*/}}
{{- define "gptoss.serveConfigV2" -}}
{{- $serve := include "gptoss.serveConfig" . | fromYaml -}}
{{- $view := omit $serve "pools" -}}
{{- $poolViews := dict -}}
{{- $apps := list -}}
{{- range $name, $pool := $serve.pools -}}
{{- $poolView := pick $pool "efforts" "max_ongoing_requests" "max_queued_requests" "spillover" "drain_timeout_s" "cold_start_timeout_s" -}}
{{- $floor := 1 -}}
{{- if $pool.autoscaling -}}
{{- if hasKey $pool.autoscaling "min_replicas" -}}{{- $floor = int $pool.autoscaling.min_replicas -}}{{- end -}}
{{- else if $pool.replicas -}}
{{- $floor = int $pool.replicas -}}
{{- end -}}
{{- $_ := set $poolView "min_replicas" $floor -}}
{{- $engine := default (dict) $pool.engine_args -}}
{{- $length := coalesce (get $engine "max_model_len") (get $engine "max-model-len") -}}
{{- if $length -}}{{- $_ = set $poolView "max_model_len" (int $length) -}}{{- end -}}
{{- $tools := list -}}
{{- range $tool := list "python" "browser" -}}
{{- if and $pool.tools (get (default (dict) $pool.tools) $tool) -}}{{- $tools = append $tools $tool -}}{{- end -}}
{{- end -}}
{{- if $tools -}}{{- $_ = set $poolView "tools" $tools -}}{{- end -}}
{{- $_ = set $poolViews $name $poolView -}}
{{- $args := dict "model_name" $serve.model_name "name" $name "pool" $pool -}}
{{- $apps = append $apps (dict "name" (printf "gptoss-pool-%s" $name) "route_prefix" nil "import_path" "gptoss_vllm.serve.app:build_pool_app" "args" $args) -}}
{{- end -}}
{{- $_ := set $view "pools" $poolViews -}}
{{- $ingress := dict "name" "gptoss" "route_prefix" "/" "import_path" "gptoss_vllm.serve.app:build_app" "args" (dict "serve" $view) -}}
{{- toYaml (dict "applications" (prepend $apps $ingress)) -}}
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

{{/*
Env of every Ray container, head and workers (dict "root" $ "worker" bool): what the processes of any Ray node
read, as a Serve HTTP proxy runs on every node (the ingress and the Serve controller on the head only, a pool
replica only on its group's workers). The Ray auth token comes from a Secret (secretKeyRef) on every Ray
container; the ingress's secrets (API keys, monitoring token, store password and CA) reach the head only; the HF
token is a file, on workers only and only while they download (model.source hf).
*/}}
{{- define "gptoss.env" -}}
{{- $v := .root.Values -}}
- name: GPTOSS_VLLM_METRICS_PORT
  value: {{ $v.metricsPort | quote }}
- name: GPTOSS_VLLM_METRICS_PORT_COUNT
  value: {{ $v.metricsPortCount | quote }}
- name: HOME
  value: /home/gptoss
{{- /* The preStop hook (files/drain.py) reads the metrics endpoints at the address they listen on. */}}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: HF_HOME
  value: /var/cache/huggingface
{{- if and .worker $v.model.hfTokenSecret.name (ne $v.model.source "pvc") }}
- name: HF_TOKEN_PATH
  value: /etc/gptoss/hf-token/{{ $v.model.hfTokenSecret.key }}
{{- end }}
{{- if eq $v.model.source "pvc" }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
{{- /* The proxy gate: Ray Serve's HTTP proxy on every node runs gptoss_vllm.serve.proxy.gate's middleware,
     bounding headers, bodies and upload time before a request reaches the ingress. */}}
- name: RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
  value: gptoss_vllm.serve.proxy.callback:middlewares
{{- if ne (toString $v.ingress.maxBodyBytes) "" }}
- name: GPTOSS_VLLM_MAX_BODY_BYTES
  value: {{ int64 $v.ingress.maxBodyBytes | quote }}
{{- end }}
- name: GPTOSS_VLLM_MAX_HEADER_BYTES
  value: {{ int64 $v.ingress.maxHeaderBytes | quote }}
- name: GPTOSS_VLLM_BODY_TIMEOUT_S
  value: {{ float64 $v.ingress.bodyTimeoutSeconds | toString | quote }}
- name: GPTOSS_VLLM_MAX_JSON_DEPTH
  value: {{ int64 $v.ingress.bodyShape.maxDepth | quote }}
- name: GPTOSS_VLLM_MAX_JSON_OBJECT_MEMBERS
  value: {{ int64 $v.ingress.bodyShape.maxObjectMembers | quote }}
- name: GPTOSS_VLLM_MAX_JSON_ARRAY_ITEMS
  value: {{ int64 $v.ingress.bodyShape.maxArrayItems | quote }}
- name: GPTOSS_VLLM_MAX_JSON_STRING_BYTES
  value: {{ int64 $v.ingress.bodyShape.maxStringBytes | quote }}
- name: GPTOSS_VLLM_MAX_JSON_WORD_BYTES
  value: {{ int64 $v.ingress.bodyShape.maxWordBytes | quote }}
{{- /* The ingress's own secrets (it runs on the head only): the monitoring token, the store's password. */}}
{{- if and (not .worker) (include "gptoss.monitoringToken" .root) }}
- name: {{ dig "ingress" "monitoring_token_env" "GPTOSS_VLLM_MONITORING_TOKEN" $v.serve }}
  valueFrom:
    secretKeyRef:
      name: {{ include "gptoss.monitoringTokenSecret" .root }}
      key: {{ $v.monitoring.tokenSecret.key }}
{{- end }}
{{- if and (not .worker) (eq $v.responseStore.backend "redis") $v.responseStore.passwordSecret.name }}
- name: GPTOSS_VLLM_RESPONSE_STORE_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $v.responseStore.passwordSecret.name }}
      key: {{ $v.responseStore.passwordSecret.key }}
{{- end }}
{{- include "gptoss.rayAuthEnv" .root }}
{{- with $v.otel }}
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
{{- with $v.extraEnv }}
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

{{/* Volumes of every Ray pod (dict "root" $ "shm" size "models" bool "worker" bool). The HF token only where a
     pool replica downloads its model (workers, model.source hf); the API keys on the head (the ingress). */}}
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
{{- if and .worker $v.model.hfTokenSecret.name (ne $v.model.source "pvc") }}
- name: hf-token
  secret:
    secretName: {{ $v.model.hfTokenSecret.name }}
    defaultMode: 0440
{{- end }}
{{- if and (not .worker) $v.apiKeys.existingSecret }}
- name: api-keys
  secret:
    secretName: {{ $v.apiKeys.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- if and (not .worker) (eq $v.responseStore.backend "redis") $v.responseStore.tlsCaSecret.name }}
- name: response-store-ca
  secret:
    secretName: {{ $v.responseStore.tlsCaSecret.name }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{/* Mounts of the Ray container (head or worker), matching gptoss.volumes. */}}
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
{{- if and .worker $v.model.hfTokenSecret.name (ne $v.model.source "pvc") }}
- {name: hf-token, mountPath: /etc/gptoss/hf-token, readOnly: true}
{{- end }}
{{- if and (not .worker) $v.apiKeys.existingSecret }}
- {name: api-keys, mountPath: {{ $v.apiKeys.mountPath }}, readOnly: true}
{{- end }}
{{- if and (not .worker) (eq $v.responseStore.backend "redis") $v.responseStore.tlsCaSecret.name }}
- {name: response-store-ca, mountPath: /etc/gptoss/response-store-ca, readOnly: true}
{{- end }}
{{- end -}}
