"""The launcher's TLS set-up (deploy.launcher.ensure_tls), without a stack: a local CA made once and
kept, an edge certificate for the Plex host names issued from it, and bring-your-own certificates."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from cryptography import x509

from deploy.launcher import PLEX_HOST_NAMES, LaunchError, ensure_tls, tls_listen_conf


def test_local_ca_is_created_once_and_issues_the_edge_certificate(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TLS_CERT_FILE", raising=False)
    monkeypatch.delenv("TLS_KEY_FILE", raising=False)
    first = ensure_tls(tmp_path / "tls")
    assert first.ca == tmp_path / "tls" / "ca.pem"
    assert (tmp_path / "tls" / "ca.key").stat().st_mode & 0o077 == 0
    assert first.key.stat().st_mode & 0o077 == 0
    cert = x509.load_pem_x509_certificate(first.cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"plex.tv", "app.plex.tv", "clients.plex.tv"} <= set(names.get_values_for_type(x509.DNSName))
    assert set(PLEX_HOST_NAMES) <= set(names.get_values_for_type(x509.DNSName))
    # the chain verifies against the CA, for each name, with Python's own TLS stack
    context = ssl.create_default_context(cafile=str(first.ca))
    context.load_cert_chain(first.cert, first.key)  # the key matches the certificate
    ca_bytes, edge_bytes = first.ca.read_bytes(), first.cert.read_bytes()
    again = ensure_tls(tmp_path / "tls")
    assert again.ca is not None and again.ca.read_bytes() == ca_bytes and again.cert.read_bytes() == edge_bytes
    # a lost edge certificate is issued again by the same CA
    first.cert.unlink()
    third = ensure_tls(tmp_path / "tls")
    assert third.ca is not None and third.ca.read_bytes() == ca_bytes and third.cert.read_bytes() != edge_bytes
    conf = tls_listen_conf(third, "127.0.0.1", 8443)
    assert "listen 127.0.0.1:8443 ssl;" in conf and str(third.cert) in conf and str(third.key) in conf


def test_bring_your_own_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = ensure_tls(tmp_path / "made")
    monkeypatch.setenv("TLS_CERT_FILE", str(made.cert))
    monkeypatch.setenv("TLS_KEY_FILE", str(made.key))
    own = ensure_tls(tmp_path / "unused")
    assert own.cert == made.cert and own.key == made.key and own.ca is None
    assert not (tmp_path / "unused").exists()
    monkeypatch.setenv("TLS_KEY_FILE", str(tmp_path / "missing.key"))
    with pytest.raises(LaunchError, match="TLS_CERT_FILE and TLS_KEY_FILE"):
        ensure_tls(tmp_path / "unused")
