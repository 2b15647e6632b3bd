{{/* Environment of every Ray container: where MLflow is, and the S3 / MLflow credentials. */}}
{{- define "temper.rayEnv" -}}
{{- if .Values.mlflow.enabled }}
- name: MLFLOW_TRACKING_URI
  value: {{ include "temper.mlflowUrl" . | quote }}
{{- if .Values.mlflow.auth.enabled }}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .Values.mlflow.auth.existingSecret }}
      key: {{ .Values.mlflow.auth.usernameKey }}
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.mlflow.auth.existingSecret }}
      key: {{ .Values.mlflow.auth.passwordKey }}
{{- end }}
{{- end }}
{{- if .Values.ray.s3Secret }}
{{- range list "AWS_ACCESS_KEY_ID" "AWS_SECRET_ACCESS_KEY" "AWS_ENDPOINT_URL" }}
- name: {{ . }}
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.ray.s3Secret }}
      key: {{ . }}
      optional: true
{{- end }}
{{- end }}
{{- end -}}

{{/* Pod-level settings shared by the head and the workers. Argument: (list . groupValues). */}}
{{- define "temper.rayPodCommon" -}}
{{- $root := index . 0 -}}
{{- $group := index . 1 -}}
securityContext:
  {{- include "temper.podSecurityContext" (list $root $root.Values.runAsUser $root.Values.runAsGroup) | nindent 2 }}
{{- include "temper.imagePullSecrets" (list $root 0) }}
volumes:
  # Ray's object store lives in /dev/shm; the container default (64 MiB) is far too small.
  - name: shm
    emptyDir:
      medium: Memory
      sizeLimit: {{ $root.Values.ray.shmSize }}
  - name: ray-logs
    emptyDir: {}
{{- with $group.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $group.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $group.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Container-level settings shared by the head and the workers (after name). */}}
{{- define "temper.rayContainerCommon" -}}
image: {{ include "temper.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
{{- with (include "temper.rayEnv" . | trim) }}
env:
  {{- . | nindent 2 }}
{{- end }}
securityContext:
  {{- include "temper.containerSecurityContext" . | nindent 2 }}
lifecycle:
  preStop:
    exec:
      command: ["ray", "stop"]
volumeMounts:
  - name: shm
    mountPath: /dev/shm
  - name: ray-logs
    mountPath: /tmp/ray
{{- end -}}
