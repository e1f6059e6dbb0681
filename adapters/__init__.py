"""Everything that touches the outside world: CLI, HTTP, Kafka, definition providers."""
