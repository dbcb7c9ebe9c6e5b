"""The watcher (``kipvs watcher``): Kubernetes list/watch (``list_watch.py``) into the event log on NATS,
exactly once (``event_log.py``); what to log for an object is its pure core (``objects.py``)."""
