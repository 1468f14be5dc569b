"""The HTTP API, routing across replicas, metrics, autoscaling glue and the CLI (top layer)."""
