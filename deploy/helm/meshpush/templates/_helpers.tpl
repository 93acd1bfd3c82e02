{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "meshpush.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified app name; also the StatefulSet name, so pods are <fullname>-<ordinal>. */}}
{{- define "meshpush.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The headless Service: gives every pod the DNS name <pod>.<headless>.<ns>.svc.<domain>. */}}
{{- define "meshpush.headless" -}}
{{- printf "%s-headless" (include "meshpush.fullname" .) -}}
{{- end -}}

{{- define "meshpush.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "meshpush.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshpush.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "meshpush.labels" -}}
helm.sh/chart: {{ include "meshpush.chart" . }}
{{ include "meshpush.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: meshpush
{{- end -}}

{{- define "meshpush.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "meshpush.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "meshpush.secretName" -}}
{{- if .Values.auth.existingSecret -}}
{{- .Values.auth.existingSecret -}}
{{- else -}}
{{- printf "%s-auth" (include "meshpush.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "meshpush.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Per-pod public URLs; $(POD_NAME) is expanded by Kubernetes from the env var POD_NAME. */}}
{{- define "meshpush.publicWsUrl" -}}
{{- if .Values.publicWsUrl -}}
{{- .Values.publicWsUrl -}}
{{- else -}}
{{- printf "ws://$(POD_NAME).%s.%s.svc.%s:%v/ws" (include "meshpush.headless" .) .Release.Namespace .Values.clusterDomain .Values.ports.ws -}}
{{- end -}}
{{- end -}}

{{- define "meshpush.publicHttpUrl" -}}
{{- if .Values.publicHttpUrl -}}
{{- .Values.publicHttpUrl -}}
{{- else -}}
{{- printf "http://$(POD_NAME).%s.%s.svc.%s:%v" (include "meshpush.headless" .) .Release.Namespace .Values.clusterDomain .Values.ports.http -}}
{{- end -}}
{{- end -}}

{{/* PromQL label matchers selecting this release's scraped series. */}}
{{- define "meshpush.ruleSelector" -}}
{{- if .Values.prometheusRule.selector -}}
{{- .Values.prometheusRule.selector -}}
{{- else -}}
{{- printf "job=%q,namespace=%q" (include "meshpush.headless" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* Fail early on values that would break a node. */}}
{{- define "meshpush.validate" -}}
{{- range $key := list "node_id" "ws_host" "ws_port" "http_host" "http_port" "public_ws_url" "public_http_url" "token_secret" "api_keys" -}}
{{- if hasKey $.Values.config $key -}}
{{- fail (printf "config.%s is set by the chart; remove it from config (see values.yaml)" $key) -}}
{{- end -}}
{{- end -}}
{{- $drain := float64 (toString (default "15" (index .Values.config "drain_timeout"))) -}}
{{- if le (float64 .Values.terminationGracePeriodSeconds) $drain -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be larger than config.drain_timeout (%v)" .Values.terminationGracePeriodSeconds $drain) -}}
{{- end -}}
{{- end -}}
