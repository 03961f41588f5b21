{{/* The pod template of a Ray node (head or worker group): the chart's image, restricted security,
writable emptyDirs on a read-only root (/tmp, /tmp/ray for Ray's sessions and logs, /dev/shm for the
object store), and S3 credentials as environment. KubeRay adds the `ray start` command. */}}
{{- define "raysft.rayPodTemplate" -}}
{{- $root := .root -}}
metadata:
  labels:
    {{- include "raysft.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
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
  {{- with .nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .tolerations }}
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
      {{- end }}
      env:
        {{- include "raysft.commonEnv" $root | nindent 8 }}
      {{- with include "raysft.s3Secret" $root }}
      envFrom:
        - secretRef:
            name: {{ . }}
      {{- end }}
      resources:
        {{- $resources := deepCopy (default dict .resources) }}
        {{- if gt (int .gpus) 0 }}
        {{- $limits := merge (dict "nvidia.com/gpu" (int .gpus)) (default dict $resources.limits) }}
        {{- $_ := set $resources "limits" $limits }}
        {{- end }}
        {{- toYaml $resources | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        - name: ray-logs
          mountPath: /tmp/ray
        - name: shm
          mountPath: /dev/shm
  volumes:
    - name: tmp
      emptyDir: {}
    - name: ray-logs
      emptyDir: {}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $root.Values.ray.sharedMemorySize }}
{{- end }}
