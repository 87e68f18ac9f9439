"""The edge agent (gRPC client, local trainer, encoder, energy meters): not built yet.

It will be a thin layer over `deltamask` and must run on Python 3.9 (the boards).
"""
