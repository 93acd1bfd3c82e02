"""The backends: etcd membership, the NATS link and its wire codec, the bus (live
routing), the JetStream store and its pipelined publishes, and the one trio ->
asyncio bridge of the control plane.
"""
