"""Generated protobuf and gRPC code for proto/deltamask/v1 (do not edit: `python proto/generate.py`).

    from deltamask.v1 import coordinator_pb2 as pb, coordinator_pb2_grpc as rpc
"""
