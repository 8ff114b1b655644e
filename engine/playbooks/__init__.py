"""Rule files: the playbook model, the YAML loader and validator (every mistake at once, with path:line:col)."""
