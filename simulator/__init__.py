"""Device-fleet simulator with ground truth."""
