"""Training components the recipes compose: optimizer, schedule, metric logging."""
