"""The marketer's condition language: its facts and types, parser, checker, compiler and reference evaluator."""
