{{- define "davinci.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "davinci.labels" -}}
app.kubernetes.io/name: davinci
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- end -}}

{{/* The service account the davinci pods run as. */}}
{{- define "davinci.serviceAccount" -}}
{{- if .Values.serviceAccount.create -}}
{{ .Values.serviceAccount.name | default (printf "%s-davinci" .Release.Name) }}
{{- else -}}
{{ .Values.serviceAccount.name | default "default" }}
{{- end -}}
{{- end -}}

{{/* The Secret the pods take their environment from ("" when none). */}}
{{- define "davinci.secretName" -}}
{{- if .Values.secrets.existingSecret -}}
{{ .Values.secrets.existingSecret }}
{{- else if .Values.secrets.create -}}
{{ .Release.Name }}-davinci
{{- end -}}
{{- end -}}

{{/* The queue URL: the bundled Redis or the external one. */}}
{{- define "davinci.redisUrl" -}}
{{- if .Values.redis.enabled -}}
redis://{{ .Release.Name }}-redis:6379
{{- else -}}
{{ .Values.redis.external.url }}
{{- end -}}
{{- end -}}

{{/* host:port of Redis for KEDA's redis-streams scaler. */}}
{{- define "davinci.redisAddress" -}}
{{- if .Values.redis.enabled -}}
{{ .Release.Name }}-redis.{{ .Release.Namespace }}.svc:6379
{{- else -}}
{{ required "redis.external.address (host:port) is needed for KEDA autoscaling with an external Redis" .Values.redis.external.address }}
{{- end -}}
{{- end -}}

{{/* The gRPC address of a target's Service ("" when the target is off). */}}
{{- define "davinci.serviceUrl" -}}
{{- $t := index .root.Values.targets .name -}}
{{- if $t.enabled -}}
http://{{ .root.Release.Name }}-{{ .name }}:{{ .root.Values.grpcPort }}
{{- end -}}
{{- end -}}

{{/* The settings file every target reads (/etc/davinci/davinci.yaml): the values' settings,
with the queue URL, listen addresses and service addresses the chart knows. */}}
{{- define "davinci.settings" -}}
{{- $s := deepCopy .Values.settings -}}
{{- $_ := set $s "queue" (merge (dict "url" (include "davinci.redisUrl" .)) ($s.queue | default dict)) -}}
{{- $listen := dict "listen" (printf "0.0.0.0:%v" .Values.grpcPort) "metrics_listen" (printf "0.0.0.0:%v" .Values.metricsPort) -}}
{{- $_ := set $s "server" (merge $listen ($s.server | default dict)) -}}
{{- $svc := dict -}}
{{- range $key, $target := dict "crawler" "crawler" "reconstructor" "reconstructor" "tokenizer_packer" "tokenizer-packer" "trainer" "trainer" -}}
{{- $_ := set $svc $key (include "davinci.serviceUrl" (dict "root" $ "name" $target)) -}}
{{- end -}}
{{- $_ := set $s "services" $svc -}}
{{- /* A restarted trainer pod follows again the cluster jobs it submitted in this namespace. */ -}}
{{- $_ := set $s "trainer" (merge ($s.trainer | default dict) (dict "reattach_namespaces" (list .Release.Namespace))) -}}
{{ toYaml $s }}
{{- end -}}
