{{- define "phoenix.fullname" -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- define "phoenix.serviceAccountName" -}}
{{- default (include "phoenix.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}
{{- define "phoenix.labels" -}}
app.kubernetes.io/name: phoenix
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}
