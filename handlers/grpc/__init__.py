"""Kiln's gRPC API over the core (grpc.aio), one module per service, none importing another.

call.py        what every call does around its work (serve_call)
tfserving.py   TensorFlow Serving's PredictionService and ModelService
oip.py         the Open Inference Protocol's GRPCInferenceService
generation.py  Kiln's Generation (streamed tokens)
health.py      grpc.health.v1 following readiness
server.py      the server that registers them (serve_grpc)
"""
