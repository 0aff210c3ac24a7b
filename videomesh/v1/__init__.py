"""Generated gRPC stubs for videomesh.v1 (see scripts/gen_protos.py). Only generated code lives here."""
