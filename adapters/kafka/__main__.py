"""`python -m flowstore.adapters.kafka`: write `envelope.schema.json` again from the envelope model."""

from flowstore.adapters.kafka.envelope import SCHEMA_PATH, schema_text

SCHEMA_PATH.write_text(schema_text())
print(f"wrote {SCHEMA_PATH}")
