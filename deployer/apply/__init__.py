"""Put one release on this machine: fetch, verify, extract safely, hooks, atomic activation, health.

Used by the agent (one deploy at a time, under the machine-wide lock) and by the one-shot
`deployer apply`. Knows nothing of queues, channels or the publisher.
"""
