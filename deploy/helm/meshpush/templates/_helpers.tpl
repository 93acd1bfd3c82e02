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

{{/* "true" when the node serves TLS (tls.secretName set), else "". */}}
{{- define "meshpush.tls" -}}
{{- if (.Values.tls).secretName -}}true{{- end -}}
{{- end -}}

{{/* URL schemes of the node's own listeners. */}}
{{- define "meshpush.wsScheme" -}}
{{- if include "meshpush.tls" . -}}wss{{- else -}}ws{{- end -}}
{{- end -}}

{{- define "meshpush.httpScheme" -}}
{{- if include "meshpush.tls" . -}}https{{- else -}}http{{- end -}}
{{- end -}}

{{/* How many pods there can be: replicaCount, or autoscaling.maxReplicas. */}}
{{- define "meshpush.podCount" -}}
{{- if .Values.autoscaling.enabled -}}
{{- .Values.autoscaling.maxReplicas -}}
{{- else -}}
{{- .Values.replicaCount -}}
{{- end -}}
{{- end -}}

{{/* "true" when one Service per pod is needed (perPodService, or per-pod ingress/route hosts). */}}
{{- define "meshpush.perPodServices" -}}
{{- if or .Values.perPodService.enabled .Values.ingress.enabled .Values.httpRoute.enabled -}}true{{- end -}}
{{- end -}}

{{/* The per-pod public host template (ingress.host, else httpRoute.host), "" if none. */}}
{{- define "meshpush.podHost" -}}
{{- if and .Values.ingress.enabled .Values.ingress.host -}}
{{- .Values.ingress.host -}}
{{- else if and .Values.httpRoute.enabled .Values.httpRoute.host -}}
{{- .Values.httpRoute.host -}}
{{- end -}}
{{- end -}}

{{/* Per-pod public URLs; $(POD_NAME) is expanded by Kubernetes from the env var POD_NAME. */}}
{{- define "meshpush.publicWsUrl" -}}
{{- if .Values.publicWsUrl -}}
{{- .Values.publicWsUrl -}}
{{- else if include "meshpush.podHost" . -}}
{{- $scheme := ternary "ws" "wss" (and .Values.ingress.enabled (not .Values.ingress.tls.secretName)) -}}
{{- printf "%s://%s/ws" $scheme (include "meshpush.podHost" .) -}}
{{- else -}}
{{- printf "%s://$(POD_NAME).%s.%s.svc.%s:%v/ws" (include "meshpush.wsScheme" .) (include "meshpush.headless" .) .Release.Namespace .Values.clusterDomain .Values.ports.ws -}}
{{- end -}}
{{- end -}}

{{- define "meshpush.publicHttpUrl" -}}
{{- if .Values.publicHttpUrl -}}
{{- .Values.publicHttpUrl -}}
{{- else -}}
{{- printf "%s://$(POD_NAME).%s.%s.svc.%s:%v" (include "meshpush.httpScheme" .) (include "meshpush.headless" .) .Release.Namespace .Values.clusterDomain .Values.ports.http -}}
{{- end -}}
{{- end -}}

{{/* The ipFilter ConfigMap, mounted at /etc/meshpush/ipfilter. */}}
{{- define "meshpush.ipFilterName" -}}
{{- printf "%s-ipfilter" (include "meshpush.fullname" .) -}}
{{- end -}}

{{/* "true" when RS256/ES256 public keys are mounted from auth.jwks.configMap, else "". */}}
{{- define "meshpush.publicKeys" -}}
{{- if ((.Values.auth).jwks).configMap -}}true{{- end -}}
{{- end -}}

{{/* "true" when config.protect_metrics parses as true the way the node parses booleans. */}}
{{- define "meshpush.protectMetrics" -}}
{{- $raw := index .Values.config "protect_metrics" | default "" | toString | trim | lower -}}
{{- if has $raw (list "1" "true" "yes" "on") -}}true{{- end -}}
{{- end -}}

{{/* PromQL label matchers selecting this release's scraped series. */}}
{{- define "meshpush.ruleSelector" -}}
{{- if .Values.prometheusRule.selector -}}
{{- .Values.prometheusRule.selector -}}
{{- else -}}
{{- printf "job=%q,namespace=%q" (include "meshpush.headless" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* A config value as the node reads it: whole numbers exactly (1000000, never 1e+06; values
reach templates as float64), lists comma separated, everything else as text. */}}
{{- define "meshpush.settingValue" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) -}}
{{- printf "%.0f" . -}}
{{- else if kindIs "slice" . -}}
{{- join "," . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{/* Fail early on values that would break a node. */}}
{{- define "meshpush.validate" -}}
{{- range $key := list "node_id" "ws_host" "ws_port" "http_host" "http_port" "public_ws_url" "public_http_url" "token_secret" "api_keys" "token_old_secrets" "tls_cert_file" "tls_key_file" "ip_filter_file" "token_public_key_file" "token_jwks_file" -}}
{{- if hasKey $.Values.config $key -}}
{{- fail (printf "config.%s is set by the chart; remove it from config (see values.yaml: ports, publicWsUrl, auth, tls, ipFilter)" $key) -}}
{{- end -}}
{{- end -}}
{{- if include "meshpush.publicKeys" . -}}
{{- if not (or .Values.auth.jwks.jwksKey .Values.auth.jwks.publicKeyKey) -}}
{{- fail "auth.jwks.configMap is set: set auth.jwks.jwksKey and/or auth.jwks.publicKeyKey" -}}
{{- end -}}
{{- end -}}
{{- range $i, $raw := splitList "\n" (toString ((.Values.ipFilter).rules | default "")) -}}
{{- $line := regexReplaceAll "#.*$" $raw "" | trim -}}
{{- if and $line (not (regexMatch "^(allow|block) +[0-9A-Fa-f:.]+(/[0-9]+)?$" $line)) -}}
{{- fail (printf "ipFilter.rules line %d: expected 'allow <cidr>' or 'block <cidr>', got %q" (add1 $i) $raw) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.serviceMonitor.enabled (include "meshpush.protectMetrics" .) (not (and .Values.serviceMonitor.bearerTokenSecret.name .Values.serviceMonitor.bearerTokenSecret.key)) -}}
{{- fail "config.protect_metrics is true: set serviceMonitor.bearerTokenSecret.name and .key (a Secret key holding one API key), or Prometheus cannot scrape /metrics" -}}
{{- end -}}
{{- if and .Values.ingress.enabled (not .Values.ingress.host) -}}
{{- fail "ingress.enabled: set ingress.host, a host name template holding $(POD_NAME), e.g. $(POD_NAME).push.example.com" -}}
{{- end -}}
{{- if and .Values.httpRoute.enabled (not (and .Values.httpRoute.host .Values.httpRoute.parentRefs)) -}}
{{- fail "httpRoute.enabled: set httpRoute.host (a template holding $(POD_NAME)) and httpRoute.parentRefs (your Gateway)" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) -}}
{{- fail "autoscaling.maxReplicas must not be smaller than autoscaling.minReplicas" -}}
{{- end -}}
{{- $drain := float64 (toString (default "15" (index .Values.config "drain_timeout"))) -}}
{{- if le (float64 .Values.terminationGracePeriodSeconds) $drain -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be larger than config.drain_timeout (%v)" .Values.terminationGracePeriodSeconds $drain) -}}
{{- end -}}
{{- end -}}
