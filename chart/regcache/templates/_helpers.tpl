{{/*
Expand the name of the chart.
*/}}
{{- define "regcache.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
A default fully qualified app name, at most 63 characters (a DNS label).
If the release name contains the chart name it is used as the full name.
*/}}
{{- define "regcache.fullname" -}}
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

{{- define "regcache.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "regcache.labels" -}}
helm.sh/chart: {{ include "regcache.chart" . }}
{{ include "regcache.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "regcache.selectorLabels" -}}
app.kubernetes.io/name: {{ include "regcache.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "regcache.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "regcache.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
More than one replica switches to a StatefulSet: each pod needs its own
volume, and an RWO volume cannot be shared.
*/}}
{{- define "regcache.scaleOut" -}}
{{- if gt (int .Values.replicaCount) 1 }}true{{ end }}
{{- end }}

{{- define "regcache.headlessName" -}}
{{- printf "%s-headless" (include "regcache.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The Secret holding the upstream credentials, or "" when there are none.
*/}}
{{- define "regcache.upstreamSecretName" -}}
{{- if .Values.upstream.existingSecret }}
{{- .Values.upstream.existingSecret }}
{{- else if .Values.upstream.username }}
{{- printf "%s-upstream" (include "regcache.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "regcache.imagePullSecretName" -}}
{{- printf "%s-pull" (include "regcache.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The pod's imagePullSecrets: the listed ones, plus the chart-made one.
*/}}
{{- define "regcache.imagePullSecrets" -}}
{{- $pullSecrets := .Values.imagePullSecrets }}
{{- if .Values.imageCredentials.create }}
{{- $pullSecrets = append $pullSecrets (dict "name" (include "regcache.imagePullSecretName" .)) }}
{{- end }}
{{- with $pullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
REGCACHE_MAX_SIZE: cache.maxSize if set, else maxSizePercent of
persistence.size, in MiB, so eviction starts before the volume is full and
writes fail.  The schema only lets plain Kubernetes quantities through.
*/}}
{{- define "regcache.maxSize" -}}
{{- if .Values.cache.maxSize }}
{{- .Values.cache.maxSize }}
{{- else }}
{{- $size := toString .Values.persistence.size }}
{{- $number := regexReplaceAll "^([0-9.]+)([A-Za-z]*)$" $size "${1}" }}
{{- $unit := regexReplaceAll "^([0-9.]+)([A-Za-z]*)$" $size "${2}" }}
{{- $units := dict "" 1 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "P" 1000000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "Pi" 1125899906842624 }}
{{- $bytes := mulf $number (get $units $unit) }}
{{- $mib := floor (divf (mulf $bytes .Values.cache.maxSizePercent) 104857600) }}
{{- printf "%dMi" (int64 $mib) }}
{{- end }}
{{- end }}

{{/*
The pod template, shared by the Deployment and the StatefulSet.  Call with
(dict "root" $ "claimVolume" true) to mount the chart's PVC as "data"; the
StatefulSet passes false and brings "data" from volumeClaimTemplates.
*/}}
{{- define "regcache.podTemplate" -}}
{{- $root := .root }}
{{- /* With a config file the file names each upstream's credentials. */}}
{{- $secret := "" }}
{{- if not $root.Values.config }}
{{- $secret = include "regcache.upstreamSecretName" $root }}
{{- end }}
{{- $annotations := dict }}
{{- if and $secret (not $root.Values.upstream.existingSecret) }}
{{- /* regcache reads its credentials once, at start: roll the pods on change. */}}
{{- $_ := set $annotations "checksum/upstream-secret" (include (print $root.Template.BasePath "/secret-upstream.yaml") $root | sha256sum) }}
{{- end }}
{{- if $root.Values.config }}
{{- /* So is the config file (the pull policy in it too). */}}
{{- $_ := set $annotations "checksum/config" (include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum) }}
{{- end }}
{{- $annotations = merge $annotations $root.Values.podAnnotations -}}
metadata:
  {{- with $annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  labels:
    {{- include "regcache.labels" $root | nindent 4 }}
    {{- with $root.Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- with include "regcache.imagePullSecrets" $root }}
  {{- . | nindent 2 }}
  {{- end }}
  serviceAccountName: {{ include "regcache.serviceAccountName" $root }}
  automountServiceAccountToken: {{ $root.Values.serviceAccount.automount }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  containers:
    - name: {{ $root.Chart.Name }}
      image: "{{ $root.Values.image.repository }}:{{ $root.Values.image.tag | default $root.Chart.AppVersion }}"
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      {{- if eq $root.Values.logFormat "json" }}
      # The image's entrypoint plus a JSON logger: one object per line.
      command: ["twistd", "-n", "--pidfile=", "--logger=regcache.logs.json", "regcache"]
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      ports:
        - name: http
          containerPort: 5000
          protocol: TCP
        {{- with $root.Values.metrics.port }}
        - name: metrics
          containerPort: {{ . }}
          protocol: TCP
        {{- end }}
      env:
        - name: REGCACHE_LISTEN
          value: "tcp:5000"
        - name: REGCACHE_STORAGE
          value: /var/lib/registry
        {{- with $root.Values.metrics.port }}
        - name: REGCACHE_METRICS_LISTEN
          value: "tcp:{{ . }}"
        {{- end }}
        {{- with $root.Values.metrics.ratelimitProbe }}
        - name: REGCACHE_RATELIMIT_PROBE
          value: {{ . | quote }}
        {{- end }}
        {{- if $root.Values.config }}
        - name: REGCACHE_CONFIG
          value: /etc/regcache/config/regcache.yaml
        {{- else }}
        - name: REGCACHE_UPSTREAM
          value: {{ $root.Values.upstream.url | quote }}
        {{- end }}
        {{- if $secret }}
        - name: REGCACHE_USERNAME
          valueFrom:
            secretKeyRef:
              name: {{ $secret }}
              key: {{ $root.Values.upstream.usernameKey }}
        - name: REGCACHE_PASSWORD_FILE
          value: /etc/regcache/upstream/password
        {{- end }}
        - name: REGCACHE_MAX_SIZE
          value: {{ include "regcache.maxSize" $root | quote }}
        {{- with $root.Values.auth }}
        {{- if .existingSecret }}
        - name: REGCACHE_HTPASSWD
          value: /etc/regcache/auth/htpasswd
        {{- end }}
        {{- range $name, $value := dict "REGCACHE_TRUSTED_NETWORKS" (join "," .trustedNetworks) "REGCACHE_TRUSTED_PROXIES" (join "," .trustedProxies) "REGCACHE_ANONYMOUS" .anonymous }}
        {{- if $value }}
        - name: {{ $name }}
          value: {{ $value | quote }}
        {{- end }}
        {{- end }}
        {{- end }}
        {{- range $name, $value := dict "REGCACHE_TAG_TTL" $root.Values.cache.tagTTL "REGCACHE_MAX_STALE" $root.Values.cache.maxStale "REGCACHE_CONNECT_TIMEOUT" $root.Values.upstream.connectTimeout "REGCACHE_HEADER_TIMEOUT" $root.Values.upstream.headerTimeout "REGCACHE_IDLE_TIMEOUT" $root.Values.upstream.idleTimeout }}
        {{- if $value }}
        - name: {{ $name }}
          value: {{ $value | quote }}
        {{- end }}
        {{- end }}
        {{- with $root.Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      livenessProbe:
        {{- toYaml $root.Values.livenessProbe | nindent 8 }}
      readinessProbe:
        {{- toYaml $root.Values.readinessProbe | nindent 8 }}
      {{- with $root.Values.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: data
          mountPath: /var/lib/registry
        - name: tmp
          mountPath: /tmp
        {{- if $secret }}
        - name: upstream-credentials
          mountPath: /etc/regcache/upstream
          readOnly: true
        {{- end }}
        {{- if $root.Values.config }}
        - name: config
          mountPath: /etc/regcache/config
          readOnly: true
        {{- end }}
        {{- if $root.Values.auth.existingSecret }}
        # Not a subPath mount: the kubelet updates the file, and regcache re-reads it.
        - name: htpasswd
          mountPath: /etc/regcache/auth
          readOnly: true
        {{- end }}
  volumes:
    {{- if not $root.Values.persistence.enabled }}
    - name: data
      emptyDir:
        sizeLimit: {{ $root.Values.persistence.size }}
    {{- else if .claimVolume }}
    - name: data
      persistentVolumeClaim:
        claimName: {{ $root.Values.persistence.existingClaim | default (include "regcache.fullname" $root) }}
    {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: {{ $root.Values.tmpDir.sizeLimit }}
    {{- if $root.Values.config }}
    - name: config
      configMap:
        name: {{ include "regcache.fullname" $root }}-config
    {{- end }}
    {{- if $root.Values.auth.existingSecret }}
    - name: htpasswd
      secret:
        secretName: {{ $root.Values.auth.existingSecret }}
        defaultMode: 0440
        items:
          - key: {{ $root.Values.auth.secretKey }}
            path: htpasswd
    {{- end }}
    {{- if $secret }}
    - name: upstream-credentials
      secret:
        secretName: {{ $secret }}
        defaultMode: 0440
        items:
          - key: {{ $root.Values.upstream.passwordKey }}
            path: password
    {{- end }}
  {{- with $root.Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $root.Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $root.Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
storageClassName: "" leaves it out (the cluster's default class), "-" asks
for no class at all (storageClassName: "").
*/}}
{{- define "regcache.storageClass" -}}
{{- if .Values.persistence.storageClass }}
{{- if eq "-" .Values.persistence.storageClass }}
storageClassName: ""
{{- else }}
storageClassName: {{ .Values.persistence.storageClass | quote }}
{{- end }}
{{- end }}
{{- end }}

{{- define "regcache.externalName" -}}
{{- default (printf "%s-%s" (include "regcache.fullname" .) .Release.Namespace) .Values.externalNameService.name | trunc 63 | trimSuffix "-" }}
{{- end }}
