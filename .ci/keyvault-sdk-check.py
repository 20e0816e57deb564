#!/usr/bin/env python3
"""Hold the test kit's Key Vault fake to the real contract: drive it with Microsoft's own Python
SDK (azure-keyvault-keys' CryptographyClient, azure-identity's ManagedIdentityCredential). If the
SDK cannot use the fake, the fake is wrong, and so are the agent tests that rely on it.

Usage: keyvault-sdk-check.py <path to nodeseal-kv-fake>. Everything stays on loopback: IMDS is
reached through AZURE_POD_IDENTITY_AUTHORITY_HOST, the vault through its https://127.0.0.1 key id,
TLS verified against the fake's test CA.
"""
import json
import os
import subprocess
import sys
import tempfile
import time


def main() -> int:
    fake_bin = sys.argv[1]
    work = tempfile.mkdtemp(prefix="kv-sdk-check-")
    fake = subprocess.Popen(
        [fake_bin, work, "sdkcert", "2048", "3072"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        info = json.loads(fake.stdout.readline())
        return check(fake, info)
    finally:
        fake.stdin.close()
        fake.wait(timeout=10)


def control(fake, line: str) -> None:
    fake.stdin.write(line + "\n")
    fake.stdin.flush()


def calls(fake, what: str) -> int:
    control(fake, f"calls {what}")
    return int(fake.stdout.readline())


def check(fake, info) -> int:
    os.environ["AZURE_POD_IDENTITY_AUTHORITY_HOST"] = info["imds_host"]
    os.environ["REQUESTS_CA_BUNDLE"] = info["ca_file"]
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    for var in ("IDENTITY_ENDPOINT", "MSI_ENDPOINT", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        os.environ.pop(var, None)

    from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
    from azure.identity import ManagedIdentityCredential
    from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    credential = ManagedIdentityCredential(client_id=info["client_id"])

    def client(kid):
        return CryptographyClient(kid, credential, verify_challenge_resource=False)

    oaep256 = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    for v in info["versions"]:
        # Wrapped as nodeseal seals: RSA-OAEP-SHA-256 with the certificate's public key.
        cert = x509.load_pem_x509_certificate(v["cert_pem"].encode())
        content_key = os.urandom(32)
        wrapped = cert.public_key().encrypt(content_key, oaep256)
        result = client(v["kid"]).unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped)
        assert result.key == content_key, "unwrap_key returned another key"
        assert result.key_id == v["kid"], (result.key_id, v["kid"])
        print(f"ok: unwrap_key RSA-OAEP-256, {cert.public_key().key_size} bits, through the 401 challenge and IMDS")
        w = client(v["kid"]).wrap_key(KeyWrapAlgorithm.rsa_oaep_256, content_key)
        assert client(v["kid"]).unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, w.encrypted_key).key == content_key
    print("ok: wrap_key/unwrap_key round trip")
    assert calls(fake, "401") >= 1, "the SDK never met the 401 challenge"
    assert calls(fake, "unwrapkey") >= 4, "unwrap_key did not reach the vault"

    first = info["versions"][0]
    cert = x509.load_pem_x509_certificate(first["cert_pem"].encode())
    wrapped = cert.public_key().encrypt(os.urandom(32), oaep256)

    # A disabled key: 403 with Key Vault's error shape, parsed by the SDK.
    control(fake, f"disable {first['version']}")
    try:
        client(first["kid"]).unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped)
        raise AssertionError("a disabled key unwrapped")
    except HttpResponseError as e:
        assert e.status_code == 403, e.status_code
        assert e.error is not None and e.error.code == "Forbidden", e.error
        assert "disabled" in e.error.message, e.error.message
    control(fake, f"enable {first['version']}")
    print("ok: 403 Forbidden for a disabled key, error code and message parsed")

    # An unknown key version: 404.
    missing = first["kid"].rsplit("/", 1)[0] + "/" + "0" * 32
    try:
        client(missing).unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped)
        raise AssertionError("an unknown key unwrapped")
    except ResourceNotFoundError as e:
        assert e.status_code == 404 and e.error.code == "KeyNotFound", (e.status_code, e.error)
    print("ok: 404 KeyNotFound")

    # 429 with Retry-After: the SDK's retry policy waits and succeeds.
    before = calls(fake, "429")
    control(fake, "throttle 1 1")
    started = time.monotonic()
    client(first["kid"]).unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped)
    assert calls(fake, "429") == before + 1
    assert time.monotonic() - started >= 0.9, "Retry-After not honoured"
    print("ok: 429 Retry-After honoured by the SDK's retry policy")

    # IMDS 410 (updating): azure-identity retries and gets a token.
    before = calls(fake, "imds")
    control(fake, "imds-gone 1")
    fresh = ManagedIdentityCredential(client_id=info["client_id"])
    token = fresh.get_token("https://vault.azure.net/.default")
    assert token.token and calls(fake, "imds") >= before + 2
    print("ok: IMDS 410 retried by azure-identity")
    print("Key Vault fake: the Azure SDK accepts it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
