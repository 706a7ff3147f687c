{{/*
Standard name helpers. Kubernetes names are limited to 63 characters (DNS labels), so every
name is truncated there and a trailing "-" trimmed.
*/}}

{{/* The chart name, or .Values.nameOverride. */}}
{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The fully qualified app name: <release>-<chart>, or just <release> when the release name
already contains the chart name, or .Values.fullnameOverride.
*/}}
{{- define "finetune-operator.fullname" -}}
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

{{/* chart-version, for the helm.sh/chart label. */}}
{{- define "finetune-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object of the release. */}}
{{- define "finetune-operator.labels" -}}
helm.sh/chart: {{ include "finetune-operator.chart" . }}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: finetune-operator
{{- end }}

{{/*
Selector labels of the operator pod, and so of the metrics Service; the ServiceMonitor selects
the Service by these. They are immutable in a Deployment's selector: do not change them.
*/}}
{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag of the operator image; the tag defaults to the appVersion. */}}
{{- define "finetune-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* repository:tag of the trainer image; the tag defaults to the appVersion. */}}
{{- define "finetune-operator.trainerImage" -}}
{{- printf "%s:%s" .Values.trainer.image.repository (default .Chart.AppVersion .Values.trainer.image.tag) }}
{{- end }}

{{/*
The rules the operator needs in each namespace it handles FineTuneJobs in: in a ClusterRole
(all namespaces) or in one Role per watched namespace. Least privilege, from what kopf and
operator/finetune_operator/apply.py actually call: no wildcards, no `update` (everything is a
PATCH: server-side apply, merge patches, kopf's annotations and finalizers) except the
finalizers subresource, and Secrets read-only, by name, only when rbac.getSecrets.
*/}}
{{- define "finetune-operator.namespacedRules" -}}
# FineTuneJobs: kopf lists/watches them and patches its finalizer and progress annotations;
# the operator reads them and merge-patches their status.
- apiGroups: [finetune.dev]
  resources: [finetunejobs]
  verbs: [get, list, watch, patch]
- apiGroups: [finetune.dev]
  resources: [finetunejobs/status]
  verbs: [patch]
# Children carry ownerReferences with blockOwnerDeletion: true. Where the
# OwnerReferencesPermissionEnforcement admission plugin is on (e.g. OpenShift), setting that
# requires `update` on the owner's finalizers subresource.
- apiGroups: [finetune.dev]
  resources: [finetunejobs/finalizers]
  verbs: [update]
# The job ConfigMap and the headless rendezvous Service: read first, created when missing,
# server-side applied only when they carry this FineTuneJob's controller reference (anything
# else holding the name is left untouched: NameConflict), and garbage-collected with the owner.
- apiGroups: [""]
  resources: [configmaps, services]
  verbs: [get, create, patch]
# The Indexed Job of trainer pods: created once, merge-patched (suspend and other mutable
# fields), deleted (foreground) before a gang restart, and watched by a kopf event handler.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
# A one-node gang's checkpoint claim: created once (never updated: a bound claim's spec is
# immutable), read back to check it is ours, garbage-collected with the FineTuneJob.
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, create]
# Pods are read only: their status and termination messages carry the trainer's progress and
# result. The Job controller, not the operator, creates them.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
# Kueue Workloads, for FineTuneJobs with runPolicy.queueName. Kueue owns a queued Job's
# spec.suspend, so runPolicy.suspend goes through the Job's Workload instead: the operator finds
# it (list by Kueue's job-uid label; it checks the ownerReference), watches Workloads to report
# admission and eviction, and merge-patches spec.active, the one field it writes. Granted always
# rather than behind a value: a rule may name a resource that is not installed (then it grants
# nothing), queueName is each job's choice, and Kueue may be installed after the operator. The
# operator reads a 403 as "may not read Workloads" and says so in the status.
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [list, watch, patch]
# Events about FineTuneJobs, from kopf and the operator (neither updates them). `list`: only
# while an attempt's Job has fewer pods than it runs, the operator lists that Job's FailedCreate
# Events (by field selector: the Job's uid and the reason), the one place where the Job
# controller says why it cannot create them (a missing ServiceAccount, a quota).
- apiGroups: [""]
  resources: [events]
  verbs: [create, list]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create]
{{- if .Values.rbac.getSecrets }}
# Before it starts a gang, the operator checks that spec.output.hub.tokenSecretRef names an
# existing Secret with that key, and reports SecretNotFound otherwise. Only `get` (by name, no
# list/watch, no writes). RBAC cannot narrow this to the referenced Secrets: their names are
# the users' to choose. Set rbac.getSecrets=false to withhold it; the operator then treats
# 403 as "cannot check" and creates the Job (the kubelet still fails the pod on a missing Secret).
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
{{- end }}
{{- with .Values.rbac.extraRules }}
# rbac.extraRules
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Cluster-scoped rules kopf needs in every mode: it watches CRDs to notice finetunejobs being
(re)installed. It only reads them. Peering is off (--standalone, one replica), so no
kopf.dev clusterkopfpeerings access.
*/}}
{{- define "finetune-operator.clusterRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [get, list, watch]
# Whether the cluster has a default StorageClass decides where a one-node gang's checkpoints go.
- apiGroups: [storage.k8s.io]
  resources: [storageclasses]
  verbs: [list]
{{- end }}
