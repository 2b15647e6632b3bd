{{/* Name prefix of every object: the release name unless overridden. */}}
{{- define "temper.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "temper.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of one component: include "temper.selectorLabels" (list . "mlflow") */}}
{{- define "temper.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "temper.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* Labels of one component's objects: include "temper.labels" (list . "mlflow") */}}
{{- define "temper.labels" -}}
{{- $root := index . 0 -}}
{{ include "temper.selectorLabels" . }}
app.kubernetes.io/part-of: temper
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version | replace "+" "_" }}
{{- with $root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The runtime image (image.tag defaults to the chart's appVersion). */}}
{{- define "temper.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "temper.mlflowImage" -}}
{{- if .Values.mlflow.image.repository -}}
{{- printf "%s:%s" .Values.mlflow.image.repository (default .Chart.AppVersion .Values.mlflow.image.tag) -}}
{{- else -}}
{{- include "temper.image" . -}}
{{- end -}}
{{- end -}}

{{- define "temper.mlflowUrl" -}}
{{- printf "http://%s-mlflow:%d" (include "temper.fullname" .) (int .Values.mlflow.port) -}}
{{- end -}}

{{- define "temper.rayClusterName" -}}
{{- printf "%s-ray" (include "temper.fullname" .) -}}
{{- end -}}

{{- define "temper.postgresPasswordSecret" -}}
{{- default (printf "%s-postgres-password" (include "temper.fullname" .)) .Values.postgres.existingSecret -}}
{{- end -}}

{{- define "temper.flaskSecret" -}}
{{- default (printf "%s-mlflow-flask" (include "temper.fullname" .)) .Values.mlflow.auth.flaskSecretKey.existingSecret -}}
{{- end -}}

{{/*
Pod Security Standard "restricted": the pod-level part. Argument: (list . uid gid).
*/}}
{{- define "temper.podSecurityContext" -}}
{{- $uid := index . 1 -}}
{{- $gid := index . 2 -}}
runAsNonRoot: true
runAsUser: {{ $uid }}
runAsGroup: {{ $gid }}
fsGroup: {{ $gid }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Pod Security Standard "restricted": the container-level part. */}}
{{- define "temper.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* imagePullSecrets of a pod spec, on its own line(s). Argument: (list . indent). */}}
{{- define "temper.imagePullSecrets" -}}
{{- $root := index . 0 -}}
{{- with $root.Values.imagePullSecrets }}
{{- $lines := list "imagePullSecrets:" }}
{{- range . }}{{ $lines = append $lines (printf "  - name: %s" .) }}{{ end }}
{{- join "\n" $lines | nindent (int (index $ 1)) }}
{{- end }}
{{- end -}}

{{/*
A Secret's value that must survive upgrades: the existing one (lookup) or a new random one.
Argument: (list . secretName key length). Returns the base64-encoded value.
*/}}
{{- define "temper.keptRandomSecret" -}}
{{- $root := index . 0 -}}
{{- $existing := lookup "v1" "Secret" $root.Release.Namespace (index . 1) -}}
{{- if and $existing (hasKey ($existing.data | default dict) (index . 2)) -}}
{{- index $existing.data (index . 2) -}}
{{- else -}}
{{- randAlphaNum (int (index . 3)) | b64enc -}}
{{- end -}}
{{- end -}}
