# Reads a FetchX509SVID stream with raw grpcio (py-spiffe's generated stubs; py-spiffe itself
# ignores the crl field) and prints, per message, the serials and a digest of the CRLs as one
# JSON line. Stops at the first message whose CRLs differ from the first message's, after the
# number of messages given, or when the stream ends.
import hashlib
import json
import sys

import grpc
from spiffe._proto import workload_pb2, workload_pb2_grpc

socket_uri, wanted = sys.argv[1], int(sys.argv[2])
target = "unix:" + socket_uri.removeprefix("unix://")
with grpc.insecure_channel(target) as channel:
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
    stream = stub.FetchX509SVID(
        workload_pb2.X509SVIDRequest(), metadata=[("workload.spiffe.io", "true")], timeout=30
    )
    first = None
    try:
        for count, message in enumerate(stream, start=1):
            digest = hashlib.sha256(b"".join(message.crl)).hexdigest()
            print(json.dumps({
                "svids": [svid.spiffe_id for svid in message.svids],
                "crls": len(message.crl),
                "crl_sha256": digest,
            }), flush=True)
            first = first or digest
            if count >= wanted or digest != first:
                break
    except grpc.RpcError as error:
        print(json.dumps({"error": error.code().name}), flush=True)
