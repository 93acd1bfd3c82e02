"""The node's I/O: TCP admission and the WebSocket gateway, sessions and the hub's
fan-out, the router (ring changes, subscriptions, migration), the HTTP API, presence,
webhooks, and the node that wires them.
"""
