"""Training recipes: one readable script per job."""
