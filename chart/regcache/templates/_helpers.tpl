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
More than one replica on the local backend switches to a StatefulSet: each
pod needs its own volume, and an RWO volume cannot be shared.
*/}}
{{- define "regcache.scaleOut" -}}
{{- if and (not (include "regcache.shared" .)) (gt (int .Values.replicaCount) 1) }}true{{ end }}
{{- end }}

{{/*
The shared level (storage.backend s3): any pod answers any request from the
bucket, so the pods are interchangeable and run from a Deployment.
*/}}
{{- define "regcache.shared" -}}
{{- if eq .Values.storage.backend "s3" }}true{{ end }}
{{- end }}

{{/*
Whether the Ingress hashes each URI to one pod: always in scale-out, where
a digest lives on one pod only; with s3 only as a locality hint.
*/}}
{{- define "regcache.hashed" -}}
{{- if or (include "regcache.scaleOut" .) (and (include "regcache.shared" .) .Values.scaleOut.localityHint) }}true{{ end }}
{{- end }}

{{/*
More than one pod of the shared level, now or once the autoscaler has its
minimum: the PodDisruptionBudget then lets drains through one at a time.
*/}}
{{- define "regcache.severalPods" -}}
{{- $pods := ternary .Values.autoscaling.minReplicas .Values.replicaCount .Values.autoscaling.enabled }}
{{- if and (include "regcache.shared" .) (gt (int $pods) 1) }}true{{ end }}
{{- end }}

{{/*
The Secret holding the bucket's key pair: the user's, or the chart's.
*/}}
{{- define "regcache.s3SecretName" -}}
{{- if .Values.storage.s3.existingSecret }}
{{- .Values.storage.s3.existingSecret }}
{{- else }}
{{- printf "%s-s3" (include "regcache.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "regcache.seaweedfsName" -}}
{{- printf "%s-seaweedfs" (include "regcache.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
SeaweedFS's own name label, so neither Service selects the other's pods.
*/}}
{{- define "regcache.seaweedfsSelectorLabels" -}}
app.kubernetes.io/name: seaweedfs
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "regcache.seaweedfsLabels" -}}
helm.sh/chart: {{ include "regcache.chart" . }}
{{ include "regcache.seaweedfsSelectorLabels" . }}
app.kubernetes.io/component: object-store
app.kubernetes.io/part-of: {{ include "regcache.name" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The bucket regcache uses: the one SeaweedFS creates defaults to "regcache".
*/}}
{{- define "regcache.bucket" -}}
{{- if .Values.seaweedfs.enabled }}
{{- .Values.storage.s3.bucket | default "regcache" }}
{{- else }}
{{- .Values.storage.s3.bucket }}
{{- end }}
{{- end }}

{{- define "regcache.s3Endpoint" -}}
{{- if .Values.seaweedfs.enabled }}
{{- printf "http://%s:8333" (include "regcache.seaweedfsName" .) }}
{{- else }}
{{- .Values.storage.s3.endpoint }}
{{- end }}
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
REGCACHE_MAX_SIZE: cache.maxSize if set, else nothing when the config file
has a cache.max_size (the variable would win over it), else maxSizePercent
of the store's volume (persistence.size, or storage.local.size with s3),
in MiB, so eviction starts before the volume is full and writes fail.  The
schema only lets plain Kubernetes quantities through.
*/}}
{{- define "regcache.maxSize" -}}
{{- if .Values.cache.maxSize }}
{{- .Values.cache.maxSize }}
{{- else if not (hasKey (.Values.config.cache | default dict) "max_size") }}
{{- $size := toString (ternary .Values.storage.local.size .Values.persistence.size (eq .Values.storage.backend "s3")) }}
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
{{- $shared := include "regcache.shared" $root }}
{{- with $root.Values.config }}
{{- if hasKey . "storage" }}
{{- fail "config.storage: set the shared level with the chart's storage values (storage.backend, storage.s3, storage.leases): they decide the workload the chart renders, and its variables would override the file" }}
{{- end }}
{{- if hasKey (.cache | default dict) "storage" }}
{{- fail "config.cache.storage: the chart mounts the store at /var/lib/registry and points REGCACHE_STORAGE there; leave it out of the config file" }}
{{- end }}
{{- end }}
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
{{- if and $shared (not $root.Values.storage.s3.existingSecret) }}
{{- /* And the bucket's key pair. */}}
{{- $_ := set $annotations "checksum/s3-secret" (include (print $root.Template.BasePath "/secret-s3.yaml") $root | sha256sum) }}
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
  {{- if and $shared $root.Values.topologySpread.enabled }}
  # Across nodes and zones, so a preempted node or a lost zone takes few
  # pods; each revision spreads on its own during a rollout (from 1.27).
  topologySpreadConstraints:
    {{- range list "kubernetes.io/hostname" "topology.kubernetes.io/zone" }}
    - topologyKey: {{ . }}
      maxSkew: {{ $root.Values.topologySpread.maxSkew }}
      whenUnsatisfiable: {{ $root.Values.topologySpread.whenUnsatisfiable }}
      labelSelector:
        matchLabels:
          {{- include "regcache.selectorLabels" $root | nindent 10 }}
      {{- if semverCompare ">=1.27-0" $root.Capabilities.KubeVersion.Version }}
      matchLabelKeys:
        - pod-template-hash
      {{- end }}
    {{- end }}
  {{- end }}
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
        {{- if $shared }}
        {{- with $root.Values.storage }}
        - name: REGCACHE_STORAGE_BACKEND
          value: s3
        # The address the other pods forward a download to while this pod
        # holds its lease.
        - name: POD_IP
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        - name: REGCACHE_ADVERTISE
          value: {{ .advertise | default "http://$(POD_IP):5000" | quote }}
        - name: REGCACHE_S3_ENDPOINT
          value: {{ include "regcache.s3Endpoint" $root | quote }}
        - name: REGCACHE_S3_BUCKET
          value: {{ include "regcache.bucket" $root | quote }}
        - name: REGCACHE_S3_ACCESS_KEY
          valueFrom:
            secretKeyRef:
              name: {{ include "regcache.s3SecretName" $root }}
              key: {{ .s3.accessKeyKey }}
        - name: REGCACHE_S3_SECRET_KEY_FILE
          value: /etc/regcache/s3/secret-key
        {{- if .s3.redirect }}
        - name: REGCACHE_S3_REDIRECT
          value: "true"
        {{- end }}
        {{- range $name, $value := dict "REGCACHE_S3_REGION" .s3.region "REGCACHE_S3_PREFIX" .s3.prefix "REGCACHE_S3_MAX_SIZE" .s3.maxSize "REGCACHE_S3_SWEEP_INTERVAL" .s3.sweepInterval "REGCACHE_LEASE_TTL" .leases.ttl "REGCACHE_REDIS" .leases.redis }}
        {{- if $value }}
        - name: {{ $name }}
          value: {{ $value | quote }}
        {{- end }}
        {{- end }}
        {{- end }}
        {{- end }}
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
        {{- with include "regcache.maxSize" $root }}
        - name: REGCACHE_MAX_SIZE
          value: {{ . | quote }}
        {{- end }}
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
        {{- if $shared }}
        - name: s3-credentials
          mountPath: /etc/regcache/s3
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
    {{- if $shared }}
    {{- with $root.Values.storage.local }}
    {{- if eq .volume "ephemeral" }}
    # Level 1: a claim made and deleted with the pod; the bucket keeps the rest.
    - name: data
      ephemeral:
        volumeClaimTemplate:
          metadata:
            labels:
              {{- include "regcache.selectorLabels" $root | nindent 14 }}
          spec:
            accessModes:
              - ReadWriteOnce
            {{- with include "regcache.storageClassName" .storageClass }}
            {{- . | nindent 12 }}
            {{- end }}
            resources:
              requests:
                storage: {{ .size }}
    {{- else }}
    # Level 1: lost with the pod, which costs bucket reads, never a pull.
    - name: data
      emptyDir:
        sizeLimit: {{ .size }}
    {{- end }}
    {{- end }}
    {{- else if not $root.Values.persistence.enabled }}
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
    {{- if $shared }}
    - name: s3-credentials
      secret:
        secretName: {{ include "regcache.s3SecretName" $root }}
        defaultMode: 0440
        items:
          - key: {{ $root.Values.storage.s3.secretKeyKey }}
            path: secret-key
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
Called with a storageClass value: "" leaves storageClassName out (the
cluster's default class), "-" asks for no class at all (storageClassName: "").
*/}}
{{- define "regcache.storageClassName" -}}
{{- if . }}
{{- if eq "-" . }}
storageClassName: ""
{{- else }}
storageClassName: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}

{{- define "regcache.externalName" -}}
{{- default (printf "%s-%s" (include "regcache.fullname" .) .Release.Namespace) .Values.externalNameService.name | trunc 63 | trimSuffix "-" }}
{{- end }}
