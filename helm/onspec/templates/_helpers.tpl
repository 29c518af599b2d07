{{- define "onspec.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "onspec.fullname" -}}
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

{{- define "onspec.selectorLabels" -}}
app.kubernetes.io/name: {{ include "onspec.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "onspec.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "onspec.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Pods that may talk to Redis and to the Ray internals (NetworkPolicy). */}}
{{- define "onspec.memberLabel" -}}
onspec.io/member: {{ .Release.Name | quote }}
{{- end -}}

{{- define "onspec.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "onspec.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "onspec.imageRef" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .appVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "onspec.image" -}}
{{- include "onspec.imageRef" (dict "image" .Values.image "appVersion" .Chart.AppVersion) -}}
{{- end -}}

{{- define "onspec.redisImage" -}}
{{- include "onspec.imageRef" (dict "image" .Values.redis.image "appVersion" "") -}}
{{- end -}}

{{- define "onspec.redisHost" -}}
{{- printf "%s-redis.%s.svc" (include "onspec.fullname" .) .Release.Namespace -}}
{{- end -}}

{{/* redis.url of the config, without the password (the builder adds it from REDIS_PASSWORD). */}}
{{- define "onspec.redisUrl" -}}
{{- if eq .Values.redis.mode "external" -}}
{{- required "redis.external.url is required when redis.mode is external" .Values.redis.external.url -}}
{{- else -}}
{{- printf "redis://%s:6379/0" (include "onspec.redisHost" .) -}}
{{- end -}}
{{- end -}}

{{- define "onspec.redisSecretName" -}}
{{- if eq .Values.redis.mode "external" -}}
{{- .Values.redis.external.existingSecret -}}
{{- else -}}
{{- default (printf "%s-redis" (include "onspec.fullname" .)) .Values.redis.auth.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "onspec.redisSecretKey" -}}
{{- if eq .Values.redis.mode "external" -}}
{{- .Values.redis.external.existingSecretKey -}}
{{- else -}}
{{- .Values.redis.auth.existingSecretKey -}}
{{- end -}}
{{- end -}}

{{- define "onspec.apiKeySecretName" -}}
{{- if .Values.apiKey.existingSecret -}}
{{- .Values.apiKey.existingSecret -}}
{{- else if .Values.apiKey.create -}}
{{- printf "%s-api-keys" (include "onspec.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "onspec.adminKeySecretName" -}}
{{- if .Values.adminKey.existingSecret -}}
{{- .Values.adminKey.existingSecret -}}
{{- else if .Values.adminKey.create -}}
{{- printf "%s-admin-keys" (include "onspec.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Where the key Secrets are mounted in the Ray pods (the API reads them as server.api_key_file / admin_key_file). */}}
{{- define "onspec.keysDir" -}}/etc/onspec/keys{{- end -}}

{{- define "onspec.pvcName" -}}
{{- default (printf "%s-data" (include "onspec.fullname" .)) .Values.persistence.existingClaim -}}
{{- end -}}

{{/* The OnspecConfig the Serve builder gets: the onspec values plus the fields the chart manages. */}}
{{- define "onspec.config" -}}
{{- $cfg := deepCopy .Values.onspec -}}
{{- $_ := set $cfg "data_dir" .Values.persistence.mountPath -}}
{{- $server := merge (dict "host" "0.0.0.0" "port" 8000) (default dict $cfg.server) -}}
{{- if include "onspec.apiKeySecretName" . }}{{ $_ := set $server "api_key_file" (printf "%s/api-keys" (include "onspec.keysDir" .)) }}{{ end -}}
{{- if include "onspec.adminKeySecretName" . }}{{ $_ := set $server "admin_key_file" (printf "%s/admin-keys" (include "onspec.keysDir" .)) }}{{ end -}}
{{- $_ := set $cfg "server" $server -}}
{{- $redis := default dict $cfg.redis -}}
{{- $_ := set $redis "url" (include "onspec.redisUrl" .) -}}
{{- $_ := set $cfg "redis" $redis -}}
{{- toJson $cfg -}}
{{- end -}}

{{/* Env, volumes and mounts shared by every Ray container. */}}
{{- define "onspec.rayEnv" -}}
- name: HOME
  value: /tmp/home
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: ONSPEC_DATA_DIR
  value: {{ .Values.persistence.mountPath | quote }}
{{- if include "onspec.redisSecretName" . }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "onspec.redisSecretName" . }}
      key: {{ include "onspec.redisSecretKey" . }}
{{- end }}
{{- end -}}

{{- define "onspec.rayMounts" -}}
- name: tmp
  mountPath: /tmp
- name: dshm
  mountPath: /dev/shm
- name: data
  mountPath: {{ .Values.persistence.mountPath }}
{{- if or (include "onspec.apiKeySecretName" .) (include "onspec.adminKeySecretName" .) }}
- name: keys
  mountPath: {{ include "onspec.keysDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "onspec.rayVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmp.sizeLimit }}
- name: dshm
  emptyDir:
    medium: Memory
- name: data
{{- if .Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "onspec.pvcName" . }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- if or (include "onspec.apiKeySecretName" .) (include "onspec.adminKeySecretName" .) }}
- name: keys
  projected:
    defaultMode: 0440
    sources:
    {{- if include "onspec.apiKeySecretName" . }}
      - secret:
          name: {{ include "onspec.apiKeySecretName" . }}
          items: [{key: {{ .Values.apiKey.existingSecretKey }}, path: api-keys}]
    {{- end }}
    {{- if include "onspec.adminKeySecretName" . }}
      - secret:
          name: {{ include "onspec.adminKeySecretName" . }}
          items: [{key: {{ .Values.adminKey.existingSecretKey }}, path: admin-keys}]
    {{- end }}
{{- end }}
{{- end -}}

{{/* Container resources plus GPUs: (dict "resources" ... "gpu" N) */}}
{{- define "onspec.resources" -}}
{{- $r := deepCopy (default dict .resources) -}}
{{- if gt (int .gpu) 0 -}}
{{- $limits := default dict $r.limits -}}
{{- $_ := set $limits "nvidia.com/gpu" (int .gpu) -}}
{{- $_ := set $r "limits" $limits -}}
{{- end -}}
{{- toYaml $r -}}
{{- end -}}

{{- define "onspec.httpProbe" -}}
httpGet:
  path: {{ .path }}
  port: 8000
periodSeconds: {{ .periodSeconds }}
failureThreshold: {{ .failureThreshold }}
timeoutSeconds: {{ .timeoutSeconds }}
{{- end -}}

{{/* Pod-level settings of a Ray group: (dict "root" $ "group" .Values.ray.X) */}}
{{- define "onspec.podCommon" -}}
serviceAccountName: {{ include "onspec.serviceAccountName" .root }}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
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
{{- end -}}
