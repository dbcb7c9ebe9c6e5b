"""The Kubernetes API client every part that talks to the API server shares (the watcher, the auth callout).

Where the credentials come from follows client-go's ``clientcmd`` order as kubectl and kube-proxy use it: an
explicit ``--kubeconfig``, else the pod's in-cluster service account, else ``~/.kube/config``
(kubernetes_asyncio's ``load_incluster_config`` / ``load_kube_config``).
"""

from __future__ import annotations

import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.config.config_exception import ConfigException

from .config import StartupError


async def api_client(kubeconfig: str = "") -> client.ApiClient:
    """A client of the API server: ``kubeconfig`` (a file path), else in-cluster, else ~/.kube/config.
    StartupError (one sentence) when none can be loaded: a missing, unreadable or malformed file."""
    configuration = client.Configuration()
    where = kubeconfig or "~/.kube/config (no in-cluster service account either)"
    try:
        if kubeconfig:
            await kube_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        else:
            try:
                kube_config.load_incluster_config(client_configuration=configuration)
            except ConfigException:
                await kube_config.load_kube_config(client_configuration=configuration)
    except (ConfigException, OSError, ValueError, TypeError, AttributeError, KeyError, yaml.YAMLError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise StartupError(f"cannot load the kubeconfig {where}: {reason}") from None
    return client.ApiClient(configuration)
