{{/* Names and labels shared by every template. */}}

{{- define "ling-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-<chart>, or the release name alone when it already contains the chart name. */}}
{{- define "ling-operator.fullname" -}}
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

{{- define "ling-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ling-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ling-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ling-operator.labels" -}}
helm.sh/chart: {{ include "ling-operator.chart" . }}
{{ include "ling-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ling-serving
{{- end -}}

{{- define "ling-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ling-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "ling-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "ling-operator.runtimeImage" -}}
{{- printf "%s:%s" .Values.runtimeImage.repository (default .Chart.AppVersion .Values.runtimeImage.tag) -}}
{{- end -}}

{{/*
The operator's RBAC rules live in one file (files/rbac-rules.yaml, owned with the operator). Rules on
cluster-scoped resources always go to a ClusterRole; the rest go to a ClusterRole when every namespace
is watched, or to a Role in each watched namespace. A rule naming both kinds of resource is split.
*/}}
{{- define "ling-operator.clusterScopedResources" -}}
{{- list "namespaces" "nodes" "customresourcedefinitions" "clusterkopfpeerings" "persistentvolumes" "storageclasses" "priorityclasses" "runtimeclasses" | toJson -}}
{{- end -}}

{{- define "ling-operator.rules" -}}
{{- $clusterScoped := include "ling-operator.clusterScopedResources" . | fromJsonArray -}}
{{- $cluster := list -}}
{{- $namespaced := list -}}
{{- range $rule := (.Files.Get "files/rbac-rules.yaml" | fromYamlArray) -}}
{{- if $rule.nonResourceURLs -}}
{{- $cluster = append $cluster $rule -}}
{{- else -}}
{{- $c := list -}}
{{- $n := list -}}
{{- range $resource := $rule.resources -}}
{{- if and (eq $resource "secrets") (not $.Values.rbac.readSecrets) -}}
{{- /* dropped: no Secret access at all */ -}}
{{- else if has (splitList "/" $resource | first) $clusterScoped -}}
{{- $c = append $c $resource -}}
{{- else -}}
{{- $n = append $n $resource -}}
{{- end -}}
{{- end -}}
{{- if $c -}}
{{- $cluster = append $cluster (merge (dict "resources" $c) (omit $rule "resources")) -}}
{{- end -}}
{{- if $n -}}
{{- $namespaced = append $namespaced (merge (dict "resources" $n) (omit $rule "resources")) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- dict "cluster" $cluster "namespaced" $namespaced | toJson -}}
{{- end -}}
