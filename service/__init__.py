"""The HTTP edge: settings, the job spec, the Redis job store and the REST API. Never imports torch or Ray."""
