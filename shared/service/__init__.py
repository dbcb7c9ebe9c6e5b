"""What every kipvs process is built from: the runtime, settings, logs, metrics, the Kubernetes client and the kipvs
command."""
