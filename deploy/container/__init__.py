"""fedcompose's container image: its Containerfile, build and health check."""
