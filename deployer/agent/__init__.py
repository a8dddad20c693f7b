"""The long-running instance agent: boot, long-poll, decide, apply one deploy at a time, report.

Layered on `deployer.apply` (putting a release on the machine), `deployer.aws` (adapters) and
`deployer.protocol` (the documents). Never imports the publisher or the CLI: its start-up time
and idle memory are benchmarked.
"""
