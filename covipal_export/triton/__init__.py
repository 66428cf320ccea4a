"""A Triton Inference Server model repository for an export (`python -m covipal_export.triton DIR --out REPO`)."""
