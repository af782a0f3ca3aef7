"""The runbook's diagnosis and post-incident write-up, done by the service itself.

``doctor.py`` runs Diagnosis Steps 1-5 plus an end-to-end probe and names the recovery option
that applies; ``incident_report.py`` documents an incident from the database;
``stripe_view.py`` is Step 4 (the endpoint as Stripe sees it) through Stripe's API.
"""
