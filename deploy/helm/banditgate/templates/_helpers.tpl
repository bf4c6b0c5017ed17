{{/* Names, labels and the values every template derives from the banditgate config. */}}

{{- define "banditgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "banditgate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* the gateway's and the worker's object names (50 + "-feedback" stays within 63) */}}
{{- define "banditgate.gatewayName" -}}{{ include "banditgate.fullname" . }}-gateway{{- end -}}
{{- define "banditgate.feedbackName" -}}{{ include "banditgate.fullname" . }}-feedback{{- end -}}

{{- define "banditgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: banditgate
{{ include "banditgate.selectorLabels" . }}
{{- end -}}

{{/* call with (dict "root" $ "component" "gateway"|"feedback") */}}
{{- define "banditgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "banditgate.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "banditgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "banditgate.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "banditgate.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* Ports and settings read from the config itself, with banditgate/config.py's defaults, so the
     manifests never disagree with what the processes bind. */}}
{{- define "banditgate.httpPort" -}}{{ dig "server" "http_port" 8080 .Values.config | int }}{{- end -}}
{{- define "banditgate.grpcPort" -}}{{ dig "server" "grpc_port" 8081 .Values.config | int }}{{- end -}}
{{- define "banditgate.metricsPort" -}}
{{- $port := dig "server" "metrics_port" nil .Values.config -}}
{{- if $port }}{{ $port | int }}{{ else }}{{ include "banditgate.httpPort" . }}{{ end -}}
{{- end -}}
{{- define "banditgate.webPort" -}}{{ dig "feedback" "web_port" 6066 .Values.config | int }}{{- end -}}
{{- define "banditgate.modelsPath" -}}{{ dig "models" "repository" "models" .Values.config }}{{- end -}}
{{- define "banditgate.feedbackPartitions" -}}{{ dig "feedback" "partitions" 4 .Values.config | int }}{{- end -}}
{{- define "banditgate.tls" -}}{{ if dig "server" "tls_cert_file" "" .Values.config }}true{{ end }}{{- end -}}

{{/* terminationGracePeriodSeconds: the config's shutdown grace (the drain), the preStop pause and a
     margin for closing clients after it */}}
{{- define "banditgate.terminationGrace" -}}
{{- $grace := dig "shutdown_grace_s" 10 .root.Values.config | float64 | ceil | int -}}
{{- add $grace .root.Values.terminationGraceMarginSeconds (.component.preStopSleepSeconds | default 0) -}}
{{- end -}}

{{/* The config as the ConfigMap carries it: the values' `config`, with `server.host` 0.0.0.0 when
     unset (probes and Services reach the pod's address, not its loopback) and, when unset,
     `server.allowed_hosts` naming the gateway's Service (the Host header of admin requests). */}}
{{- define "banditgate.config" -}}
{{- $config := deepCopy (.Values.config | default dict) -}}
{{- if not (kindIs "map" (get $config "server")) -}}{{- $_ := set $config "server" dict -}}{{- end -}}
{{- $server := get $config "server" -}}
{{- if not (hasKey $server "host") -}}{{- $_ := set $server "host" "0.0.0.0" -}}{{- end -}}
{{- if has (toString (get $server "host")) (list "127.0.0.1" "localhost" "::1") -}}
{{- fail "config.server.host is a loopback address: probes and Services could not reach the pods (use 0.0.0.0 or ::)" -}}
{{- end -}}
{{- if not (hasKey $server "allowed_hosts") -}}
{{- $svc := include "banditgate.gatewayName" . -}}
{{- $ns := .Release.Namespace -}}
{{- $_ := set $server "allowed_hosts" (list "localhost" "127.0.0.1" $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns)) -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Secrets: the Secret the env vars come from (the chart's own, or an existing one) */}}
{{- define "banditgate.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-secrets" (include "banditgate.fullname" .)) -}}
{{- end -}}

{{/* The secret env vars a process reads (banditgate/config.py), call with (dict "root" $ "names" (list ...)):
     every one named, optional, with an existing Secret; only those given a value otherwise. */}}
{{- define "banditgate.secretEnv" -}}
{{- $values := dict "BANDITGATE_ADMIN_TOKENS" .root.Values.secrets.adminTokens "BANDITGATE_INFER_TOKENS" .root.Values.secrets.inferTokens "BANDITGATE_KAFKA_PASSWORD" .root.Values.secrets.kafkaPassword "BANDITGATE_REDIS_PASSWORD" .root.Values.secrets.redisPassword -}}
{{- range .names }}
{{- if or $.root.Values.secrets.existingSecret (get $values .) }}
- name: {{ . }}
  valueFrom:
    secretKeyRef:
      name: {{ include "banditgate.secretName" $.root }}
      key: {{ . }}
      optional: true
{{- end }}
{{- end }}
{{- end -}}

{{- define "banditgate.createSecret" -}}
{{- if and (not .Values.secrets.existingSecret) (or .Values.secrets.adminTokens .Values.secrets.inferTokens .Values.secrets.kafkaPassword .Values.secrets.redisPassword) -}}true{{- end -}}
{{- end -}}

{{/* topology spread: the values' constraints, each selecting the component's own pods */}}
{{- define "banditgate.topologySpread" -}}
{{- range .constraints }}
- {{ toYaml . | indent 2 | trim }}
  labelSelector:
    matchLabels:
      {{- include "banditgate.selectorLabels" (dict "root" $.root "component" $.component) | nindent 6 }}
{{- end }}
{{- end -}}

{{/* The model repository's volume: the PVC, or an emptyDir the init container fills */}}
{{- define "banditgate.modelsVolume" -}}
- name: models
{{- if .Values.models.init.enabled }}
  emptyDir: {sizeLimit: {{ .Values.models.init.sizeLimit }}}
{{- else }}
  persistentVolumeClaim:
    claimName: {{ .Values.models.persistence.existingClaim | default (printf "%s-models" (include "banditgate.fullname" .)) }}
    readOnly: true
{{- end }}
{{- end -}}

{{- define "banditgate.modelsInit" -}}
{{- $init := .Values.models.init -}}
- name: fetch-models
  image: {{ printf "%s:%s" $init.image.repository $init.image.tag }}
  imagePullPolicy: {{ $init.image.pullPolicy }}
  {{- with $init.command }}
  command:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $init.args }}
  args:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  env:
    - {name: HOME, value: /tmp}
    - {name: MODELS_DIR, value: {{ include "banditgate.modelsPath" . | quote }}}
    {{- with $init.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $init.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  resources:
    {{- toYaml $init.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - {name: models, mountPath: {{ include "banditgate.modelsPath" . | quote }}}
    - {name: tmp, mountPath: /tmp}
{{- end -}}
