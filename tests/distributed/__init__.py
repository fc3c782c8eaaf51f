"""Process-level tests with real Dask processes: a scheduler and workers on loopback,
workers killed and joining, TLS, a store on S3 (moto)."""
