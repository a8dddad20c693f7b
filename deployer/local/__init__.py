"""Dev only (the `emulator` extra): moto in server mode on loopback, and `deployer demo` on it.

Imported by nothing but the CLI and the test suite.
"""
