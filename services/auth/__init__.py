"""The auth service (skeleton: health, readiness, metrics and migrations; features come in its own issue)."""
