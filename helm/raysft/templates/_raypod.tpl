{{/* The pod template of a Ray node (head or worker group): the chart's image, restricted security,
writable emptyDirs on a read-only root (/tmp, /tmp/ray for Ray's sessions and logs, /dev/shm for the
object store), S3 credentials and the job secrets as environment. A worker group adds its own
labels, annotations, environment, volumes, affinity, priority class and container security
context (`.group`; the head's values have none of these). KubeRay adds the `ray start` command. */}}
{{- define "raysft.rayPodTemplate" -}}
{{- $root := .root -}}
{{- $group := .group -}}
metadata:
  labels:
    {{- with $group.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- include "raysft.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
  {{- with $group.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- if $root.Values.ray.serviceAccount.create }}
  serviceAccountName: {{ include "raysft.rayClusterName" $root }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .name }}
      image: {{ include "raysft.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      {{- if .ports }}
      ports:
        - name: gcs-server
          containerPort: 6379
        - name: dashboard
          containerPort: 8265
        - name: client
          containerPort: 10001
        - name: metrics
          containerPort: 8080
        - name: serve
          containerPort: 8000
      {{- end }}
      env:
        {{- include "raysft.commonEnv" $root | nindent 8 }}
        {{- with $group.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- $secrets := concat (compact (list (include "raysft.s3Secret" $root))) $root.Values.ray.jobSecrets }}
      {{- if or $secrets $group.envFrom }}
      envFrom:
        {{- range $secrets }}
        - secretRef:
            name: {{ . }}
        {{- end }}
        {{- with $group.envFrom }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      resources:
        {{- $resources := deepCopy (default dict $group.resources) }}
        {{- if gt (int $group.gpus) 0 }}
        {{- $limits := merge (dict "nvidia.com/gpu" (int $group.gpus)) (default dict $resources.limits) }}
        {{- $_ := set $resources "limits" $limits }}
        {{- end }}
        {{- toYaml $resources | nindent 8 }}
      securityContext:
        {{- toYaml (default $root.Values.securityContext $group.securityContext) | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        - name: ray-logs
          mountPath: /tmp/ray
        - name: shm
          mountPath: /dev/shm
        {{- with $group.volumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir: {}
    - name: ray-logs
      emptyDir: {}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $root.Values.ray.sharedMemorySize }}
  {{- with $group.volumes }}
  {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
