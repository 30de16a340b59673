"""The scheduler: embedders, the pending pool, the batching policy, the service loop."""
