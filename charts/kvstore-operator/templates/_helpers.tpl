{{/*
Names. The operator's own pods are labelled app.kubernetes.io/name=kvstore-operator (by default),
never app.kubernetes.io/name=kvstore: that label, with managed-by=kvs-operator, marks the node pods
the operator creates, and the NetworkPolicies below select on it.
*/}}
{{- define "kvstore-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name: the release name alone when it already contains the chart name, so
`helm install kvstore-operator ...` names everything "kvstore-operator", not
"kvstore-operator-kvstore-operator". 63 characters at most (DNS label).
*/}}
{{- define "kvstore-operator.fullname" -}}
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

{{- define "kvstore-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object of the chart. */}}
{{- define "kvstore-operator.labels" -}}
helm.sh/chart: {{ include "kvstore-operator.chart" . }}
{{ include "kvstore-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ include "kvstore-operator.tag" . | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: kvstore
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector of the operator pods: stable across upgrades (a Deployment's selector is immutable). */}}
{{- define "kvstore-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvstore-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kvstore-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kvstore-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kvstore-operator.tag" -}}
{{- .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The image: a digest, when given, pins it (and wins over the tag). */}}
{{- define "kvstore-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "kvstore-operator.tag" .) }}
{{- end }}
{{- end }}

{{/* The Lease the replicas elect a leader with: one per release, so two releases never share one. */}}
{{- define "kvstore-operator.leaseName" -}}
{{- default (include "kvstore-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/*
The namespaces that get the node NetworkPolicy: networkPolicy.nodes.namespaces when given, else
the watched namespace, else the release's own. Printed as a JSON list (include returns a string).
*/}}
{{- define "kvstore-operator.nodeNamespaces" -}}
{{- if .Values.networkPolicy.nodes.namespaces }}
{{- toJson .Values.networkPolicy.nodes.namespaces }}
{{- else }}
{{- toJson (list (default .Release.Namespace .Values.watchNamespace)) }}
{{- end }}
{{- end }}

{{/*
RBAC rules: exactly operator/src/rbac.rs RULES, one rule per resource so the two read alike
(operator/tests/chart.rs compares them). "watch" are the rules scoped to the namespaces the
operator watches; "leaderElection" is the Lease rule, scoped to the operator's own namespace.
*/}}
{{- define "kvstore-operator.watchRules" -}}
# The custom resource: watched; the finalizer is added and removed with a patch; read by the
# backup controller to find a backup's cluster.
- apiGroups: ["kvstore.dev"]
  resources: ["kvstoreclusters"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["kvstore.dev"]
  resources: ["kvstoreclusters/status"]
  verbs: ["patch"]
# Backups: watched; their outcome is written to their status. Schedules create them (server-side
# apply) and delete the ones retention drops.
- apiGroups: ["kvstore.dev"]
  resources: ["kvstorebackups"]
  verbs: ["list", "watch", "patch", "delete"]
- apiGroups: ["kvstore.dev"]
  resources: ["kvstorebackups/status"]
  verbs: ["patch"]
- apiGroups: ["kvstore.dev"]
  resources: ["kvstorebackupschedules"]
  verbs: ["list", "watch"]
- apiGroups: ["kvstore.dev"]
  resources: ["kvstorebackupschedules/status"]
  verbs: ["patch"]
# Children: server-side applied, watched (owned), deleted on cleanup; the StatefulSet is also read.
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["get", "list", "watch", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["list", "watch", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["list", "watch", "patch", "delete"]
# The cluster token and (spec.tls) the cluster CA: created once (never overwritten), read to
# call the nodes' admin API; the pods' certificates: server-side applied when issued or renewed.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create", "patch", "delete"]
# Node pods: watched for readiness and addresses; deleted one at a time to roll a changed
# template, or with their volume claim to replace a member whose machine or volume is gone.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "delete"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["delete"]
# Events about view changes and failures.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{- define "kvstore-operator.leaderElectionRules" -}}
# Leader election: one Lease, read, created once, then renewed by server-side apply.
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "create", "patch"]
{{- end }}
