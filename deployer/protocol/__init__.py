"""The contract between CI and instances: documents, S3 layout, names, limits and the error tree.

Standard library and PyYAML only: no boto3, no I/O. Everything that crosses the wire or the
bucket is defined, parsed and checked here, once (docs/design.md).
"""
