"""The OpenAI-compatible server for one box (`python -m covipal_export.serve DIR`)."""
