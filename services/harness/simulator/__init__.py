"""The Kubernetes API simulator (``kipvs simulate``): ``store.py`` (objects, resourceVersions, the watch
window), ``server.py`` (the REST paths and faults), ``watches.py`` (watch streams), ``discovery.py``,
``tokens.py`` (TokenRequest, TokenReview), ``scenario.py`` (YAML scenarios of objects and timed steps)."""
