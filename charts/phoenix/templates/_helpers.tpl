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

{{/* A PodDisruptionBudget only makes sense with a spare replica: with one it would block
every drain of the operator's node. */}}
{{- define "phoenix.pdbEnabled" -}}
{{- if and .Values.podDisruptionBudget.enabled (gt (int .Values.replicaCount) 1) -}}true{{- end -}}
{{- end -}}

{{/* Cross-field checks the JSON schema cannot express. */}}
{{- define "phoenix.validate" -}}
{{- if eq (int .Values.operator.metricsPort) (int .Values.operator.livenessPort) -}}
{{- fail (printf "operator.metricsPort and operator.livenessPort are both %v: give them different ports" .Values.operator.metricsPort) -}}
{{- end -}}
{{- if and (not .Values.serviceAccount.create) (not .Values.serviceAccount.name) -}}
{{- fail "serviceAccount.create is false: set serviceAccount.name to the existing ServiceAccount the operator runs as" -}}
{{- end -}}
{{- $le := .Values.leaderElection -}}
{{- if and (gt (int .Values.replicaCount) 1) (not $le.enabled) -}}
{{- fail (printf "replicaCount is %v but leaderElection.enabled is false: more than one operator needs leader election (set leaderElection.enabled=true, or replicaCount=1)" .Values.replicaCount) -}}
{{- end -}}
{{- if $le.enabled -}}
{{- if ge (int $le.renewDeadlineSeconds) (int $le.leaseDurationSeconds) -}}
{{- fail (printf "leaderElection.renewDeadlineSeconds (%v) must be below leaderElection.leaseDurationSeconds (%v): a leader must stop writing before a standby may take the lease" $le.renewDeadlineSeconds $le.leaseDurationSeconds) -}}
{{- end -}}
{{- if ge (int $le.retryPeriodSeconds) (int $le.renewDeadlineSeconds) -}}
{{- fail (printf "leaderElection.retryPeriodSeconds (%v) must be below leaderElection.renewDeadlineSeconds (%v): the leader must get to renew at least once within the deadline" $le.retryPeriodSeconds $le.renewDeadlineSeconds) -}}
{{- end -}}
{{- end -}}
{{- if and (include "phoenix.pdbEnabled" .) (ge (int .Values.podDisruptionBudget.minAvailable) (int .Values.replicaCount)) -}}
{{- fail (printf "podDisruptionBudget.minAvailable (%v) must be below replicaCount (%v), or no operator pod could ever be drained" .Values.podDisruptionBudget.minAvailable .Values.replicaCount) -}}
{{- end -}}
{{- end -}}
