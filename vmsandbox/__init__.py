"""vmsandbox."""
