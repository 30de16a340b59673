"""The domain every component shares: job types, errors, the Redis queue and the SQL store."""
