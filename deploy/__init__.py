"""Deployment files; ``deploy.brokers`` is the broker table the tests and bench import."""
