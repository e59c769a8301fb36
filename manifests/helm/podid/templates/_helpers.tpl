{{/*
Names.
*/}}
{{- define "podid.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "podid.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "podid.agent.fullname" -}}
{{- printf "%s-agent" (include "podid.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "podid.controller.fullname" -}}
{{- printf "%s-controller" (include "podid.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "podid.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels. `podid.labels` takes a dict with the root context and the component.
*/}}
{{- define "podid.selectorLabels" -}}
app.kubernetes.io/name: {{ include "podid.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "podid.labels" -}}
helm.sh/chart: {{ include "podid.chart" .root }}
{{ include "podid.selectorLabels" . }}
app.kubernetes.io/part-of: podid
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Derived settings.
*/}}
{{- define "podid.namespaced" -}}
{{- if or .Values.namespaced (eq .Values.mode "managed") }}true{{ end }}
{{- end }}

{{/* The identity-rule flags, the same for the agent and the controller. */}}
{{- define "podid.identityRuleArgs" -}}
{{- with .Values.identityRules.nodeIdentities }}
- --node-identity={{ join "," . }}
{{- end }}
{{- if .Values.identityRules.allowNodeIdentities }}
- --allow-node-identities
{{- end }}
{{- with .Values.identityRules.allowedAuthorities }}
- --allowed-authority={{ join "," . }}
{{- end }}
{{- if .Values.identityRules.sameNamespaceSecrets }}
- --same-namespace-secrets
{{- end }}
{{- end }}

{{- define "podid.controllerEnabled" -}}
{{- if and (eq .Values.mode "standard") .Values.controller.enabled }}true{{ end }}
{{- end }}

{{- define "podid.agent.image" -}}
{{- printf "%s:%s" .Values.agent.image.repository (default .Chart.AppVersion .Values.agent.image.tag) }}
{{- end }}

{{- define "podid.controller.image" -}}
{{- printf "%s:%s" .Values.controller.image.repository (default .Chart.AppVersion .Values.controller.image.tag) }}
{{- end }}

{{- define "podid.controller.leaseName" -}}
{{- default (include "podid.controller.fullname" .) .Values.controller.leaderElection.name }}
{{- end }}

{{- define "podid.controller.leaseNamespace" -}}
{{- default .Release.Namespace .Values.controller.leaderElection.namespace }}
{{- end }}

{{- define "podid.controller.cloudConfigSecret" -}}
{{- default (printf "%s-cloud-config" (include "podid.fullname" .)) .Values.controller.cloudConfig.secretName }}
{{- end }}

{{/* Container paths of the host mounts, shared by the agent and the detacher. */}}
{{- define "podid.agent.bpffsMount" -}}/host/sys/fs/bpf{{- end }}
{{- define "podid.agent.cgroupMount" -}}/host/sys/fs/cgroup{{- end }}
{{- define "podid.agent.bpffsDir" -}}
{{- printf "%s/%s" (include "podid.agent.bpffsMount" .) .Values.agent.bpffsSubdir }}
{{- end }}

{{/* The agent's container security context; the capability list lives in values. */}}
{{- define "podid.agent.securityContext" -}}
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
# Root is required: added capabilities are only effective for uid 0
# (Kubernetes has no ambient capabilities).
runAsUser: 0
runAsGroup: 0
runAsNonRoot: false
capabilities:
  drop:
    - ALL
  add:
    {{- toYaml .Values.agent.capabilities | nindent 4 }}
    {{- if eq .Values.agent.listenMode "pod-netns" }}
    # Zero-policy mode: setns() into pods' network namespaces.
    - SYS_ADMIN
    {{- end }}
seccompProfile:
  {{- toYaml .Values.agent.seccompProfile | nindent 2 }}
{{- end }}
