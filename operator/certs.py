"""The admission webhook's serving certificate when cert-manager is not used: the operator
makes its own CA and serving certificate, keeps them in a ``kubernetes.io/tls`` Secret
(``tls.crt``, ``tls.key``, ``ca.crt``), puts the CA into the
ValidatingWebhookConfiguration's ``caBundle``, and replaces both before they expire, as
KEDA's and Gatekeeper's operators do. The Helm chart therefore renders no key material:
two renders are identical (what Argo CD's ``helm template`` needs), and an upgrade never
leaves the API server trusting a CA the running operator does not serve.

Certificates (RFC 5280) use ECDSA P-256 keys and SHA-256 signatures
(``cryptography``). The CA is valid for ``validity_days``; the serving certificate for
the Service's DNS names (``NAME``, ``NAME.NS``, ``NAME.NS.svc``) likewise. Both are
replaced when less than ``renew_days`` (at most a third of the validity) remain, when the
names differ, or when the pair does not match. A rotation publishes the new CA together
with the old one (``ca.crt`` holds both, newest first), so API servers that still have the
previous caBundle keep verifying until the operator serves the new certificate; the old
CA's key is never kept, so trusting it admits nothing new.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Optional

logger = logging.getLogger("argosy.operator.certs")


@dataclass(frozen=True)
class Pems:
    """PEM bytes of the CA certificate, the serving certificate and its private key."""

    ca: bytes
    cert: bytes
    key: bytes


def service_dns_names(service: str, namespace: str) -> list[str]:
    """The names the API server may use to reach ``service`` in ``namespace``."""
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc"]


def generate(dns_names: list[str], validity_days: int, now: Optional[dt.datetime] = None) -> Pems:
    """A new CA and a serving certificate for ``dns_names`` signed by it (both valid
    ``validity_days`` from ``now``, backdated 5 minutes for clock skew)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = now or dt.datetime.now(dt.timezone.utc)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=validity_days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{dns_names[-1]} webhook CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[-1])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return Pems(ca.public_bytes(pem), cert.public_bytes(pem),
                key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def rotation_reason(pems: Optional[Pems], dns_names: list[str], renew_days: int,
                    now: Optional[dt.datetime] = None) -> Optional[str]:
    """Why ``pems`` must be replaced (missing, unreadable, expiring within ``renew_days``,
    other DNS names, not signed by the CA, key not matching), or None when they can stay."""
    if pems is None or not (pems.ca and pems.cert and pems.key):
        return "no certificate yet"
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    now = now or dt.datetime.now(dt.timezone.utc)
    try:
        ca = x509.load_pem_x509_certificate(pems.ca)
        cert = x509.load_pem_x509_certificate(pems.cert)
        key = serialization.load_pem_private_key(pems.key, password=None)
    except ValueError as e:
        return f"unreadable ({e})"
    horizon = now + dt.timedelta(days=renew_days)
    for what, c in (("CA", ca), ("certificate", cert)):
        if c.not_valid_after_utc <= horizon:
            return f"the {what} expires {c.not_valid_after_utc:%Y-%m-%d}, within {renew_days} days"
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if sorted(names) != sorted(dns_names):
        return f"it is for {names}, the Service needs {dns_names}"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception) as e:  # InvalidSignature and friends
        return f"not signed by the CA ({type(e).__name__})"
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        return "the key does not match the certificate"
    return None


def _still_valid_ca(ca_pem: bytes, now: Optional[dt.datetime]) -> bool:
    """Whether the first certificate of ``ca_pem`` parses and has not expired."""
    from cryptography import x509

    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        return False
    return ca.not_valid_after_utc > (now or dt.datetime.now(dt.timezone.utc))


def _secret_pems(secret: Optional[dict]) -> Optional[Pems]:
    if not secret:
        return None
    data = secret.get("data") or {}
    try:
        return Pems(*(base64.b64decode(data.get(k) or "") for k in ("ca.crt", "tls.crt", "tls.key")))
    except ValueError:
        return None


def ensure(kube, namespace: str, secret_name: str, webhook_configuration: str, dns_names: list[str], *,
           validity_days: int = 365, renew_days: int = 30, now: Optional[dt.datetime] = None) -> Pems:
    """Make sure the Secret holds a valid CA + serving certificate for ``dns_names`` and the
    ValidatingWebhookConfiguration trusts that CA; returns what the webhook must serve.

    The Secret is (re)written only when :func:`rotation_reason` says so; the written one is
    read back, so when two operator replicas race, both serve what the API server kept.
    Every webhook of the configuration gets ``clientConfig.caBundle`` = the CA (JSON patch).
    ``now`` (default: the clock) is the time the expiry check uses; new certificates are
    always issued from the real clock.

    Raises:
        kubernetes.dynamic.exceptions.DynamicApiError: an API call failed.
    """
    secret = kube.get("v1", "Secret", namespace, secret_name)
    pems = _secret_pems(secret)
    renew_days = min(renew_days, max(validity_days // 3, 1))  # a short validity must not renew on every check
    reason = rotation_reason(pems, dns_names, renew_days, now)
    if reason is not None:
        logger.info("webhook certificate in Secret %s/%s: issuing a new one (%s)", namespace, secret_name, reason)
        new = generate(dns_names, validity_days)  # issued on the real clock; ``now`` only decides
        if pems is not None and _still_valid_ca(pems.ca, now):
            # trust the old CA too: API servers that have not seen the new caBundle yet still
            # verify the old certificate, and the ones that have verify the new one
            new = Pems(new.ca + pems.ca, new.cert, new.key)
        body = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                "metadata": {"name": secret_name, "namespace": namespace,
                             "labels": {"app.kubernetes.io/managed-by": "argosy-operator",
                                        "app.kubernetes.io/component": "webhook"}},
                "data": {"ca.crt": base64.b64encode(new.ca).decode(), "tls.crt": base64.b64encode(new.cert).decode(),
                         "tls.key": base64.b64encode(new.key).decode()}}
        if secret is not None:  # a precondition: a replica that lost the race gets 409 and re-reads
            body["metadata"]["resourceVersion"] = secret["metadata"]["resourceVersion"]
        try:
            kube.apply(body)
        except Exception as e:  # noqa: BLE001
            if getattr(e, "status", None) != 409:
                raise
            logger.info("another replica rotated the webhook certificate first; using its")
        pems = _secret_pems(kube.get("v1", "Secret", namespace, secret_name)) or new
    inject_ca_bundle(kube, webhook_configuration, pems.ca)
    return pems


def inject_ca_bundle(kube, webhook_configuration: str, ca_pem: bytes) -> bool:
    """Set ``clientConfig.caBundle`` of every webhook of the ValidatingWebhookConfiguration
    to ``ca_pem``; True when something changed (False also when it does not exist yet)."""
    vwc = kube.get("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration", None,
                   webhook_configuration)
    if vwc is None:
        logger.warning("ValidatingWebhookConfiguration %s not found: no caBundle injected", webhook_configuration)
        return False
    want = base64.b64encode(ca_pem).decode()
    ops = []
    for i, hook in enumerate(vwc.get("webhooks") or []):
        cfg = hook.get("clientConfig") or {}
        if cfg.get("caBundle") != want:
            ops.append({"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": want})
    if not ops:
        return False
    ops.insert(0, {"op": "test", "path": "/metadata/resourceVersion", "value": vwc["metadata"]["resourceVersion"]})
    kube.json_patch("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration", None,
                    webhook_configuration, ops)
    logger.info("ValidatingWebhookConfiguration %s: caBundle set", webhook_configuration)
    return True


def write_files(directory: str, pems: Pems) -> bool:
    """Write ``tls.crt`` (certificate) and ``tls.key`` into ``directory`` atomically (rename),
    key readable by the owner only; True when the contents changed."""
    os.makedirs(directory, exist_ok=True)
    changed = False
    for name, data in (("tls.crt", pems.cert), ("tls.key", pems.key), ("ca.crt", pems.ca)):
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                if f.read() == data:
                    continue
        except OSError:
            pass
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        changed = True
    return changed
