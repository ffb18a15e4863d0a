"""Everything that is neither model, sharding nor data: config checks, optimizer, train step, loop, metrics."""
