"""Generated protobuf and gRPC code for proto/kvcache.proto. Do not edit by hand.

Regenerate after changing the .proto with ``python -m kvcache._pb.generate``
(needs grpcio-tools, a test dependency); a test fails when the committed code
and the .proto disagree.
"""
