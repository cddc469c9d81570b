# An Envoy-like SDS client on the gRPC project's own Envoy protos (the xds-protos package),
# unmodified: subscribes to `default` and `ROOTCA`, checks what Envoy checks (types, names, PEM
# contents, the SPIFFE validator's configuration), ACKs the first response, NACKs the rotation
# that follows and listens for a resend, then prints what it saw as one JSON object.
import json
import os
import queue
import sys

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_spiffe_validator_config_pb2 as spiffe_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.rpc import status_pb2

SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
NAMES = ["default", "ROOTCA"]

socket_uri = sys.argv[1]
target = "unix:" + socket_uri.removeprefix("unix://")
requests = queue.Queue()


def outgoing():
    # Never blocks for long: grpc's thread that consumes this iterator must be free to end
    # whenever the call does.
    while True:
        try:
            request = requests.get(timeout=0.2)
        except queue.Empty:
            if finished:
                return
            continue
        if request is None:
            return
        yield request


def ask(nonce="", version="", error=None, node=None):
    requests.put(discovery_pb2.DiscoveryRequest(
        node=node, resource_names=NAMES, type_url=SECRET, response_nonce=nonce,
        version_info=version, error_detail=error,
    ))


def secrets(response):
    assert response.type_url == SECRET, response.type_url
    found = {}
    for resource in response.resources:
        assert resource.type_url == SECRET, resource.type_url
        secret = secret_pb2.Secret()
        resource.Unpack(secret)
        found[secret.name] = secret
    return found


def certificate(secret):
    assert secret.WhichOneof("type") == "tls_certificate", secret.WhichOneof("type")
    chain = x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)
    key = load_pem_private_key(secret.tls_certificate.private_key.inline_bytes, password=None)
    spki = lambda k: k.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    uris = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {
        "spiffe_ids": [str(u) for u in uris.get_values_for_type(x509.UniformResourceIdentifier)],
        "key_matches": spki(key.public_key()) == spki(chain[0].public_key()),
        "serial": format(chain[0].serial_number, "x"),
    }


def validator(secret):
    assert secret.WhichOneof("type") == "validation_context", secret.WhichOneof("type")
    custom = secret.validation_context.custom_validator_config
    config = spiffe_pb2.SPIFFECertValidatorConfig()
    assert custom.typed_config.Unpack(config), custom.typed_config.type_url
    bundle = config.trust_domains[0].trust_bundle.inline_bytes
    return {
        "name": custom.name,
        "trust_domains": [d.name for d in config.trust_domains],
        "roots": len(x509.load_pem_x509_certificates(bundle)),
        "crls": bundle.count(b"-----BEGIN X509 CRL-----"),
    }


report = {}
finished = False
node = base_pb2.Node(id="py-envoy", cluster="tests")
with grpc.insecure_channel(target) as channel:
    stream = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets(outgoing(), timeout=30)
    ask(node=node)
    try:
        first = next(stream)
        found = secrets(first)
        report["names"] = sorted(found)
        report["first"] = certificate(found["default"])
        report["validator"] = validator(found["ROOTCA"])
        ask(first.nonce, first.version_info)
        rotated = next(stream)
        report["rotated"] = certificate(secrets(rotated)["default"])
        report["versions_differ"] = rotated.version_info != first.version_info
        rejected = status_pb2.Status(code=3, message="py-envoy rejected it on purpose")
        ask(rotated.nonce, first.version_info, error=rejected)
        # The rejected version must not come back; the next rotation may (a new version).
        nxt = next(stream)
        report["after_nack_same_version"] = nxt.version_info == rotated.version_info
    except grpc.RpcError as error:
        report["error"] = error.code().name
    finally:
        finished = True
        requests.put(None)
        stream.cancel()
print(json.dumps(report), flush=True)
# Leave at once: an interpreter shutdown can wait on grpc's threads of the cancelled call.
os._exit(0)
