{{/* Names and labels, defined once. */}}
{{- define "phoenix.fullname" -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "phoenix.serviceAccountName" -}}
{{- default (include "phoenix.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "phoenix.selectorLabels" -}}
app.kubernetes.io/name: phoenix
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "phoenix.labels" -}}
{{ include "phoenix.selectorLabels" . }}
app.kubernetes.io/component: operator
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "phoenix.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* The namespaces the operator watches: nil means all of them. */}}
{{- define "phoenix.clusterScoped" -}}
{{- if eq .Values.rbac.scope "cluster" -}}true{{- end -}}
{{- end -}}

{{/* Cross-field checks the JSON schema cannot express. */}}
{{- define "phoenix.validate" -}}
{{- if eq (int .Values.operator.metricsPort) (int .Values.operator.livenessPort) -}}
{{- fail (printf "operator.metricsPort and operator.livenessPort are both %v: give them different ports" .Values.operator.metricsPort) -}}
{{- end -}}
{{- if and (not .Values.serviceAccount.create) (not .Values.serviceAccount.name) -}}
{{- fail "serviceAccount.create is false: set serviceAccount.name to the existing ServiceAccount the operator runs as" -}}
{{- end -}}
{{- end -}}
