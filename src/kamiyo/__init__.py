"""kamiyo: the service that keeps users' subscription tiers in step with Stripe."""

__version__ = "0.1.0"
