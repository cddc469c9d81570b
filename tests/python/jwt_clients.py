# JWT-SVIDs with py-spiffe, unmodified, and PyJWT: fetches tokens, validates one offline against
# the JWT bundle (py-spiffe's own check), through the agent (ValidateJWTSVID), and with PyJWT and
# the JWKS the agent serves; prints what it saw as one JSON object.
# Named jwt_clients.py, not jwt.py: a script run from this directory would otherwise shadow PyJWT
# (the `jwt` package py-spiffe imports).
import json
import sys

import grpc
import jwt
from spiffe import JwtSvid, TrustDomain, WorkloadApiClient
from spiffe._proto import workload_pb2, workload_pb2_grpc

socket_uri, audience = sys.argv[1], sys.argv[2]
report = {}
try:
    with WorkloadApiClient(socket_path=socket_uri) as client:
        svid = client.fetch_jwt_svid(audience={audience})
        report["spiffe_id"] = str(svid.spiffe_id)
        report["audience"] = sorted(svid.audience)
        report["all"] = sorted(str(s.spiffe_id) for s in client.fetch_jwt_svids(audience={audience}))
        bundles = client.fetch_jwt_bundles()
        bundle = bundles.get_bundle_for_trust_domain(TrustDomain("example.org"))
        offline = JwtSvid.parse_and_validate(svid.token, bundle, {audience})
        report["py_spiffe_offline"] = str(offline.spiffe_id)
        report["agent_validated"] = str(client.validate_jwt_svid(svid.token, audience).spiffe_id)
        try:
            client.validate_jwt_svid(svid.token, "someone-else")
            report["wrong_audience_refused"] = False
        except Exception:
            report["wrong_audience_refused"] = True

    # The JWKS as the agent sends it, read with the raw stubs, then PyJWT alone.
    target = "unix:" + socket_uri.removeprefix("unix://")
    with grpc.insecure_channel(target) as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        stream = stub.FetchJWTBundles(
            workload_pb2.JWTBundlesRequest(), metadata=[("workload.spiffe.io", "true")], timeout=10
        )
        raw = json.loads(next(stream).bundles["spiffe://example.org"])
        stream.cancel()
    report["jwks_use"] = sorted({key.get("use") for key in raw["keys"]})
    keys = jwt.PyJWKSet.from_dict(raw)
    kid = jwt.get_unverified_header(svid.token)["kid"]
    key = next(k for k in keys.keys if k.key_id == kid)
    claims = jwt.decode(svid.token, key.key, algorithms=["ES256"], audience=audience)
    report["pyjwt_sub"] = claims["sub"]
    report["pyjwt_owner"] = claims["tessera"]["owner"]
except Exception as error:  # report, don't crash: the test asserts on the report
    report["error"] = f"{type(error).__name__}: {error}"
print(json.dumps(report))
