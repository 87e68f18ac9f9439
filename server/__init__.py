"""The coordinator (gRPC service, round state machine, registry, persistence): not built yet.

It will be a thin layer over `deltamask` (see DESIGN.md section 2 and the coordinator issue).
"""
