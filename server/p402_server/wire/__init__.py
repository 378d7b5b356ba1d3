"""The wire contract shared by every way in: conversions between protobuf messages
and the core's values (validated at the edge, every error naming its field) and the
one mapping from exceptions to gRPC status codes. The runtime answers in these
messages; servicers, gateways and the dashboard use the same conversions."""
