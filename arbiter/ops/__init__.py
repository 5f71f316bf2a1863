"""The master's operations half: what people and tools see of a running master (the admin
listener with its status page, status JSON and metrics, the access log, systemd notifications,
the error log).

These modules read the supervisor and the proxy. Only the supervisor wires them in (arbiter.py,
and the error log for workers and health checks); the proxy never imports them: it is the hot path.
"""
