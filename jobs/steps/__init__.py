"""The queue's steps in Redis, one module per role (see ``jobs.queue``)."""
