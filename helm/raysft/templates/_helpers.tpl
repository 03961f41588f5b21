{{/* Names are truncated to 63 characters: the DNS label limit of Kubernetes names and labels. */}}
{{- define "raysft.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "raysft.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* A name derived from the full name with a suffix, still within 63 characters. */}}
{{- define "raysft.suffixed" -}}
{{- $root := index . 0 }}{{- $suffix := index . 1 }}
{{- printf "%s-%s" (include "raysft.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix }}
{{- end }}

{{- define "raysft.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "raysft.selectorLabels" -}}
app.kubernetes.io/name: {{ include "raysft.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "raysft.labels" -}}
helm.sh/chart: {{ include "raysft.chart" . }}
{{ include "raysft.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: raysft
{{- end }}

{{- define "raysft.controlPlaneSelectorLabels" -}}
{{ include "raysft.selectorLabels" . }}
app.kubernetes.io/component: control-plane
{{- end }}

{{- define "raysft.image" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-%s" .Chart.AppVersion .Values.image.flavor) .Values.image.tag) }}
{{- end }}

{{- define "raysft.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "raysft.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The RayCluster. KubeRay names its head Service `<cluster>-head-svc`, which must fit in 63
characters too. */}}
{{- define "raysft.rayClusterName" -}}
{{- printf "%s-ray" (include "raysft.fullname" . | trunc 50 | trimSuffix "-") }}
{{- end }}

{{/* Ray Serve's HTTP proxy on the head, where the control plane sends chats. */}}
{{- define "raysft.serveAddress" -}}
{{- $ray := include "raysft.rayAddress" . | urlParse }}
{{- printf "http://%s:8000" (regexReplaceAll ":[0-9]+$" $ray.host "") }}
{{- end }}

{{- define "raysft.rayAddress" -}}
{{- if .Values.ray.create }}
{{- printf "http://%s-head-svc.%s.svc:8265" (include "raysft.rayClusterName" .) .Release.Namespace }}
{{- else }}
{{- .Values.ray.address }}
{{- end }}
{{- end }}

{{- define "raysft.rayTokenSecret" -}}
{{- if .Values.ray.auth.existingSecret }}
{{- .Values.ray.auth.existingSecret }}
{{- else }}
{{- include "raysft.suffixed" (list . "ray-token") }}
{{- end }}
{{- end }}

{{- define "raysft.apiKeySecret" -}}
{{- default (include "raysft.suffixed" (list . "api-keys")) .Values.apiKeys.existingSecret }}
{{- end }}

{{- define "raysft.databaseSecret" -}}
{{- default (include "raysft.suffixed" (list . "database")) .Values.database.existingSecret }}
{{- end }}

{{/* The S3 Secret's name, or nothing when the pods' own identity reaches the bucket. */}}
{{- define "raysft.s3Secret" -}}
{{- if .Values.s3.existingSecret }}
{{- .Values.s3.existingSecret }}
{{- else if .Values.s3.credentials.accessKeyId }}
{{- include "raysft.suffixed" (list . "s3") }}
{{- end }}
{{- end }}

{{/* A random secret value, kept across upgrades: the one already in the cluster wins. */}}
{{- define "raysft.keptRandom" -}}
{{- $root := index . 0 }}{{- $secret := index . 1 }}{{- $key := index . 2 }}
{{- $existing := lookup "v1" "Secret" $root.Release.Namespace $secret }}
{{- if and $existing (hasKey $existing.data $key) }}
{{- index $existing.data $key }}
{{- else }}
{{- randAlphaNum 48 | b64enc }}
{{- end }}
{{- end }}

{{/* Settings both the control plane and the Ray nodes need; writable caches on a read-only root. */}}
{{- define "raysft.commonEnv" -}}
- name: HOME
  value: /tmp/home
- name: XDG_CACHE_HOME
  value: /tmp/cache
- name: TRITON_CACHE_DIR
  value: /tmp/cache/triton
{{- end }}

{{/* What the schema cannot say (it compares no two values), refused with the fix. */}}
{{- define "raysft.validate" -}}
{{- range .Values.ray.workerGroups }}
{{- if gt (int .minReplicas) (int .maxReplicas) }}
{{- fail (printf "ray.workerGroups[%s]: minReplicas (%d) is above maxReplicas (%d); raise maxReplicas" .name (int .minReplicas) (int .maxReplicas)) }}
{{- end }}
{{- $group := .name }}
{{- range .volumes }}
{{- if has .name (list "tmp" "ray-logs" "shm") }}
{{- fail (printf "ray.workerGroups[%s]: volume name %q is the chart's own (tmp, ray-logs, shm); rename it" $group .name) }}
{{- end }}
{{- end }}
{{- range .volumeMounts }}
{{- if has (trimSuffix "/" .mountPath) (list "/tmp" "/tmp/ray" "/dev/shm") }}
{{- fail (printf "ray.workerGroups[%s]: mountPath %s is the chart's own writable volume; mount elsewhere" $group .mountPath) }}
{{- end }}
{{- end }}
{{- range $key, $_ := .labels }}
{{- if or (hasPrefix "app.kubernetes.io/" $key) (hasPrefix "helm.sh/" $key) }}
{{- fail (printf "ray.workerGroups[%s]: label %s is set by the chart; use a label of your own" $group $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* What the created Ray cluster can ever hold, as JSON {gpus, cpus}: every worker group at its
maxReplicas. CPU limits like "500m" count as a whole CPU, as Ray rounds them. Empty with an
existing cluster. */}}
{{- define "raysft.clusterCapacity" -}}
{{- $gpus := 0 }}{{- $cpus := 0.0 }}
{{- if .Values.ray.create }}
{{- range .Values.ray.workerGroups }}
{{- $gpus = add $gpus (mul (int .maxReplicas) (int .gpus)) }}
{{- $cpu := toString (dig "limits" "cpu" (dig "requests" "cpu" "0" (default dict .resources)) (default dict .resources)) }}
{{- $perWorker := ternary (divf (trimSuffix "m" $cpu | float64) 1000.0) (float64 $cpu) (hasSuffix "m" $cpu) | ceil }}
{{- $cpus = addf $cpus (mulf (int .maxReplicas) $perWorker) }}
{{- end }}
{{- dict "gpus" $gpus "cpus" (int $cpus) | toJson }}
{{- else }}
{{- dict | toJson }}
{{- end }}
{{- end }}
