{{- define "imagemesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "imagemesh.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "imagemesh.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "imagemesh.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "imagemesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "imagemesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "imagemesh.selector" -}}
app.kubernetes.io/name: {{ include "imagemesh.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "imagemesh.image" -}}
{{ .root.Values.image.repository }}/{{ .name }}:{{ default .root.Chart.AppVersion .root.Values.image.tag }}
{{- end }}

{{- define "imagemesh.configMap" -}}
{{ include "imagemesh.fullname" . }}-mirrors
{{- end }}

{{- define "imagemesh.peeringSecret" -}}
{{ default (printf "%s-peering" (include "imagemesh.fullname" .)) .Values.peering.existingSecret }}
{{- end }}

{{- /* kubo's Peering.Peers from multiaddrs ending in /p2p/<id>. */}}
{{- define "imagemesh.kuboPeers" -}}
{{- $peers := list }}
{{- range .Values.ipfs.kubo.peers }}
{{- $parts := splitList "/p2p/" . }}
{{- $peers = append $peers (dict "ID" (last $parts) "Addrs" (list (first $parts))) }}
{{- end }}
{{- $peers | toJson }}
{{- end }}
