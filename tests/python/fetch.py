# Fetches an X.509-SVID and the bundles with py-spiffe, unmodified, and prints what it got as JSON.
import json
import sys

from cryptography.hazmat.primitives.serialization import Encoding
from spiffe import WorkloadApiClient

socket_uri = sys.argv[1]
try:
    with WorkloadApiClient(socket_path=socket_uri) as client:
        svid = client.fetch_x509_svid()
        bundle_set = client.fetch_x509_bundles()
        bundles = bundle_set.bundles
        bundles = bundles() if callable(bundles) else bundles
        print(json.dumps({
            "spiffe_id": str(svid.spiffe_id),
            "chain_len": len(svid.cert_chain),
            "leaf_der_hex": svid.leaf.public_bytes(Encoding.DER).hex(),
            "not_after": int(svid.leaf.not_valid_after_utc.timestamp()),
            "trust_domains": sorted(b.trust_domain.name for b in bundles),
            "authorities": sum(len(b.x509_authorities) for b in bundles),
        }))
except Exception as error:  # report, don't crash: the test asserts on the code
    cause = error.__cause__
    code = cause.code().name if cause is not None and hasattr(cause, "code") else None
    print(json.dumps({"error": type(error).__name__, "code": code, "message": str(error)}))
