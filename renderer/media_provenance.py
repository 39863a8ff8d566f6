"""Where a clip came from, in one record, and that record signed into the MP4 as a C2PA manifest.

`build_record` is the ONE place the provenance of a render is assembled. Everything that tells a person or a
tool where a clip came from is derived from its output, so they cannot disagree:
    sidecar JSON      sidecar["provenance"] = the record
    MP4 container     mp4_tags(record)      (ffmpeg global tags)
    C2PA manifest     c2pa_manifest(record) (a c2pa.created action, digitalSourceType trainedAlgorithmicMedia,
                                             plus the record itself as the assertion `com.wanrender.provenance`)
    report            jobs/report.py reads the record back from the sidecar

Signing uses c2pa-python (the C2PA reference library, Rust core, runs offline) with the studio's certificate
chain and private key from the config (`provenance.cert`, `provenance.key`; PEM). `verify_mp4` reads a file back
and says whether the signature and the content hash are valid, and — given the studio's root (`trust`) — whether
the certificate chains to it.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from renderer.prompts import prompt_hash

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
ASSERTION_LABEL = "com.wanrender.provenance"
GENERATOR = "wanrender"
# preset -> the released model it runs (name, version); tiny presets are random-weight test models
MODEL_RELEASES = {"t2v_a14b": ("Wan2.2-T2V-A14B", "2.2"), "i2v_a14b": ("Wan2.2-I2V-A14B", "2.2"),
                  "ti2v_5b": ("Wan2.2-TI2V-5B", "2.2")}
SIGNING_ALGS = ("es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519")


def model_release(preset_name: str) -> tuple[str, str]:
    return MODEL_RELEASES.get(preset_name, (f"wanrender-{preset_name} (random weights)", "test"))


def build_record(*, shot_id: str, preset_name: str, checkpoint_fingerprint: str, prompt: str,
                 negative_prompt: str | None, seed: int, tier: str, code_version: str,
                 prompt_fields: dict | None = None, label: str | None = None) -> dict[str, Any]:
    """The provenance of one render (plain JSON types). The prompt itself is not in the record, only its
    SHA-256: the record travels inside the delivered file, the prompt stays in the studio's sidecar."""
    model_name, model_version = model_release(preset_name)
    return {
        "ai_generated": True,
        "digital_source_type": DIGITAL_SOURCE_TYPE,
        "generator": GENERATOR,
        "code_version": code_version,
        "model": model_name,
        "model_version": model_version,
        "model_preset": preset_name,
        "checkpoint_fingerprint": checkpoint_fingerprint,
        "prompt_sha256": prompt_hash(prompt),
        "negative_prompt_sha256": prompt_hash(negative_prompt) if negative_prompt else None,
        "prompt_fields": sorted(prompt_fields) if prompt_fields else None,
        "seed": int(seed),
        "tier": tier,
        "shot_id": shot_id,
        "visible_label": label,
    }


def mp4_tags(record: dict[str, Any]) -> dict[str, str]:
    """Container tags (ffmpeg global metadata) derived from the record."""
    keys = ("code_version", "model", "model_version", "model_preset", "checkpoint_fingerprint", "prompt_sha256",
            "seed", "tier", "digital_source_type")
    tags = {k: str(record[k]) for k in keys if record.get(k) is not None}
    tags["ai_generated"] = "true" if record["ai_generated"] else "false"
    return tags


def c2pa_manifest(record: dict[str, Any], title: str) -> dict[str, Any]:
    """The C2PA manifest definition for c2pa.Builder: an AI-created action plus the record as an assertion."""
    return {
        "claim_generator_info": [{"name": GENERATOR, "version": record["code_version"]}],
        "title": title,
        "format": "video/mp4",
        "assertions": [
            {"label": "c2pa.actions.v2", "data": {"actions": [{
                "action": "c2pa.created",
                "digitalSourceType": record["digital_source_type"],
                "softwareAgent": {"name": GENERATOR, "version": record["code_version"]},
                "parameters": {"model": record["model"], "model_version": record["model_version"],
                               "seed": record["seed"], "tier": record["tier"]},
            }]}},
            {"label": ASSERTION_LABEL, "data": record},
        ],
    }


# -- signing ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SigningSettings:
    """The studio's signing identity (config `provenance`). sign: 'auto' signs when cert and key are given."""

    sign: str = "auto"  # auto | true | false
    cert: str | None = None  # PEM: the signing certificate followed by its issuers (not the root is fine)
    key: str | None = None  # PEM private key of the signing certificate
    alg: str = "es256"
    tsa_url: str | None = None  # an RFC 3161 time-stamp authority; None: no time stamp (offline)
    trust: str | None = None  # PEM root(s) that `verify` accepts as the studio's

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "SigningSettings":
        d = {k: v for k, v in (d or {}).items() if k in cls.__dataclass_fields__}
        if "sign" in d:
            d["sign"] = str(d["sign"]).lower()
        return cls(**d)

    @property
    def enabled(self) -> bool:
        return self.sign == "true" or (self.sign == "auto" and bool(self.cert and self.key))

    def problems(self) -> list[tuple[str, str]]:
        """(field, message) for a signing setup that cannot work — checked before any model loads."""
        if self.sign not in ("auto", "true", "false"):
            return [("provenance.sign", f"must be auto, true or false, got {self.sign!r}")]
        if not self.enabled:
            if self.sign == "auto" and bool(self.cert) != bool(self.key):
                return [("provenance.cert" if not self.cert else "provenance.key",
                         "give both provenance.cert and provenance.key (PEM files) to sign, or neither")]
            return []
        out = []
        if self.alg.lower() not in SIGNING_ALGS:
            out.append(("provenance.alg", f"unknown signing algorithm {self.alg!r}: use one of "
                                          f"{', '.join(SIGNING_ALGS)}"))
        for name in ("cert", "key"):
            path = getattr(self, name)
            if not path:
                out.append((f"provenance.{name}", f"provenance.sign=true needs provenance.{name}=/path/to/"
                                                  f"{'chain' if name == 'cert' else 'key'}.pem"))
            elif not Path(path).is_file():
                out.append((f"provenance.{name}", f"{path} does not exist: check the path"))
        if out:
            return out
        try:
            _check_key_matches_cert(Path(self.cert).read_bytes(), Path(self.key).read_bytes())
        except ValueError as e:
            out.append(("provenance.cert", str(e)))
        return out


def _check_key_matches_cert(cert_pem: bytes, key_pem: bytes) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as e:
        raise ValueError(f"the certificate file is not a PEM certificate chain ({e})") from e
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"the key file is not an unencrypted PEM private key ({e})") from e
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if (certs[0].public_key().public_bytes(serialization.Encoding.DER, pub)
            != key.public_key().public_bytes(serialization.Encoding.DER, pub)):
        raise ValueError("the private key does not belong to the first certificate in the chain: the signing "
                         "certificate must come first, then its issuers")


def sign_mp4(src: str | Path, dest: str | Path, record: dict[str, Any], signing: SigningSettings) -> Path:
    """Embed a signed C2PA manifest for `record` into a copy of `src` at `dest` (atomic: temp name, then
    rename; `src` is left as it was)."""
    import c2pa

    dest = Path(dest)
    signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(
        signing.alg.lower(), Path(signing.cert).read_bytes(), Path(signing.key).read_bytes(), signing.tsa_url))
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}.mp4")
    try:
        with c2pa.Builder(c2pa_manifest(record, dest.name)) as builder, open(src, "rb") as s, \
                open(tmp, "w+b") as d:
            builder.sign(signer, "video/mp4", s, d)
            d.flush()
            os.fsync(d.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        signer.close()
    return dest


# -- verifying --------------------------------------------------------------------------------------------------
@dataclass
class Verification:
    path: str
    signed: bool
    signature_valid: bool = False
    content_hash_valid: bool = False
    trusted: bool | None = None  # None: no trust anchors given
    state: str | None = None
    failures: list[str] = field(default_factory=list)
    record: dict[str, Any] | None = None
    signer: str | None = None
    ai_generated: bool = False
    error: str | None = None  # the file could not be read as a C2PA asset at all

    @property
    def ok(self) -> bool:
        """Signed, signature and content hash valid, the chain accepted (when a root was given), and no other
        validation failure (an assertion changed after signing fails here, not in the two hashes)."""
        return (self.signed and self.signature_valid and self.content_hash_valid and self.trusted is not False
                and not self.failures)

    def lines(self) -> list[str]:
        yes = lambda b: "valid" if b else "INVALID"  # noqa: E731
        if self.error:
            return [f"{self.path}: cannot be checked: {self.error}"]
        if not self.signed:
            return [f"{self.path}: no C2PA manifest: the file is not signed (or its manifest was stripped)"]
        out = [f"{self.path}: C2PA manifest signed by {self.signer or '?'} ({self.state})",
               f"  signature:     {yes(self.signature_valid)}",
               f"  content hash:  {yes(self.content_hash_valid)}",
               "  certificate:   " + ("not checked against a trust list (pass --trust ROOT.pem)" if self.trusted
                                      is None else "chains to the given root" if self.trusted else "UNTRUSTED"),
               f"  AI-generated:  {'yes (trainedAlgorithmicMedia)' if self.ai_generated else 'not declared'}"]
        if self.record:
            r = self.record
            out.append(f"  model {r.get('model')} {r.get('model_version')} ({r.get('checkpoint_fingerprint')}), "
                       f"seed {r.get('seed')}, tier {r.get('tier')}, prompt sha256 {str(r.get('prompt_sha256'))[:16]}"
                       f"…, wanrender {r.get('code_version')}")
        if self.failures and self.signature_valid and self.content_hash_valid:
            out.append("  manifest:      INVALID (its contents do not match what was signed)")
        out += [f"  failure: {f}" for f in self.failures]
        return out


def verify_mp4(path: str | Path, trust: str | Path | None = None) -> Verification:
    """Read the C2PA manifest of `path` back and judge it. Never raises for a bad or unsigned file."""
    import c2pa

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    settings: dict[str, Any] = {"verify": {"verify_trust": trust is not None}}
    if trust is not None:
        from cryptography import x509

        pem = Path(trust).read_bytes()
        try:
            x509.load_pem_x509_certificates(pem)
        except ValueError as e:
            raise ValueError(f"--trust {trust} is not a PEM certificate file ({e}): give the studio's root "
                             f"certificate(s)") from e
        settings["trust"] = {"trust_anchors": pem.decode()}
    ctx = c2pa.Context(settings=c2pa.Settings.from_dict(settings))
    try:
        reader = c2pa.Reader.try_create(str(path), context=ctx)
    except c2pa.C2paError as e:  # not a media type C2PA knows, or a file too damaged to parse
        return Verification(str(path), signed=False, state="Invalid",
                            error=f"the file or its C2PA manifest cannot be parsed ({e})")
    if reader is None:
        return Verification(str(path), signed=False)
    with reader:
        store = json.loads(reader.json())
        results = (store.get("validation_results") or {}).get("activeManifest") or {}
        active = store.get("manifests", {}).get(store.get("active_manifest"), {})
        state = store.get("validation_state")
    ok_codes = {r["code"] for r in results.get("success", [])}
    bad = results.get("failure", [])
    bad_codes = {r["code"] for r in bad}
    hash_ok = any(c.endswith("Hash.match") for c in ok_codes) and not any("Hash" in c or c.startswith(
        "assertion.dataHash") for c in bad_codes)
    sig_ok = "claimSignature.validated" in ok_codes and not any(c.startswith("claimSignature") or
                                                                 c.startswith("timeStamp") for c in bad_codes)
    trusted = None if trust is None else ("signingCredential.trusted" in ok_codes
                                          and "signingCredential.untrusted" not in bad_codes)
    record, ai = None, False
    for a in active.get("assertions", []):
        if a.get("label") == ASSERTION_LABEL:
            record = a.get("data")
        if a.get("label", "").startswith("c2pa.actions"):
            ai = ai or any(x.get("digitalSourceType") == DIGITAL_SOURCE_TYPE for x in a["data"].get("actions", []))
    sig = active.get("signature_info") or {}
    failures = [f"{r['code']}: {r.get('explanation', '')}" for r in bad
                if not (trust is None and r["code"] == "signingCredential.untrusted")]
    return Verification(str(path), True, sig_ok, hash_ok, trusted, state, failures, record,
                        f"{sig.get('common_name')} / {sig.get('issuer')}", ai)


# -- a test chain (tests and `make render`; a studio uses its own CA) ---------------------------------------------
def make_test_chain(folder: str | Path, organization: str = "wanrender test studio") -> dict[str, Path]:
    """A root CA and an ES256 signing certificate that meets the C2PA certificate profile (digitalSignature
    key usage, emailProtection EKU, issued by a CA, not self-signed). Writes root.pem, chain.pem (signer then
    root) and signer.key; returns their paths. For tests and the example only."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)])

    def usage(sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=sign, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=not sign,
                             crl_sign=not sign, encipher_only=False, decipher_only=False)

    def cert(subject, issuer, pub, key, ca: bool):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(pub)
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
             .not_valid_after(now + datetime.timedelta(days=365))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
             .add_extension(usage(not ca), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False))
        if not ca:
            b = (b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
                 .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                                critical=False))
        return b.sign(key, hashes.SHA256())

    root_key, signer_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = cert(name(f"{organization} root CA"), name(f"{organization} root CA"), root_key.public_key(), root_key,
                True)
    signer = cert(name(f"{organization} render farm"), root.subject, signer_key.public_key(), root_key, False)
    pem = serialization.Encoding.PEM
    paths = {"root": folder / "root.pem", "chain": folder / "chain.pem", "key": folder / "signer.key"}
    paths["root"].write_bytes(root.public_bytes(pem))
    paths["chain"].write_bytes(signer.public_bytes(pem) + root.public_bytes(pem))
    paths["key"].write_bytes(signer_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    os.chmod(paths["key"], 0o600)
    return paths


def stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


if __name__ == "__main__":  # python -m renderer.media_provenance make-test-chain FOLDER
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "make-test-chain":
        p = make_test_chain(sys.argv[2])
        print(f"test signing chain in {sys.argv[2]}: provenance.cert={p['chain']} provenance.key={p['key']} "
              f"(verify with --trust {p['root']})")
        sys.exit(0)
    print("usage: python -m renderer.media_provenance make-test-chain FOLDER", file=sys.stderr)
    sys.exit(2)
