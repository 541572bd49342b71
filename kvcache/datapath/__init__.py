"""The framed TCP data path between L2 clients and cache nodes (bulk frames beside gRPC control).

`protocol` lays out the messages (documented byte by byte in proto/README.md),
`listener` serves a node's data port, `client` talks to one.
"""
