"""The CI side: create the bucket and topic, and publish releases."""
