"""The pure logic, sans-IO and importable without a running loop: the client <-> node
frame protocol, one session's state machine and feeds, WebSocket frames and upgrade
parsing, ids and their encoding, the ring, tokens, limits and the stats records.
"""
