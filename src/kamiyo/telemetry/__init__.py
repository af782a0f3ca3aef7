"""What the service tells operators about itself.

``metrics.py`` holds the Prometheus instruments that the webhook route and the worker count on,
and the collector that derives the state gauges from the database at scrape time.
``delivery_stats.py`` is the SQL of the per-minute delivery counts every process shares.
``heartbeat.py`` lets a worker say it is alive. ``webhook_health.py`` turns all of that into the
checks behind ``GET /api/v1/payments/webhook/health`` and ``kamiyo doctor``.
"""
