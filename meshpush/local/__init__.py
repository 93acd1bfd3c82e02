"""Local-cluster tooling: real etcd, nats-server and node processes on this machine
(``meshpush dev``, the tests, the benchmarks), and a TCP fault proxy.
"""
