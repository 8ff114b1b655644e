"""Data: the SQL model, migrations, the database, ingestion and import, the facts builder and the seeder."""
