"""The relay against nats-servers that demand a password, a token, an nkey or TLS.

Each server is started for its test with throw-away credentials; certificates come
from a throw-away CA (trustme).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import nacl.signing
import nkeys
import pytest
import trustme

from outbox_relay.config import NatsAuth, Settings
from outbox_relay.embedded import EmbeddedNats
from outbox_relay.errors import CredentialsRefusedError, ServerUnavailableError
from outbox_relay.jetstream import connect_nats
from tests.helpers import drained, emit_events, running_relay, wait_until


def _server(*args: str) -> Iterator[EmbeddedNats]:
    with EmbeddedNats(extra_args=args) as server:
        yield server


async def _relays_through(settings: Settings) -> None:
    async with running_relay(settings):
        emit_events(settings, 5)
        await wait_until(lambda: drained(settings))
    nc = await connect_nats(settings)
    try:
        info = await nc.jetstream().stream_info(settings.stream)
    finally:
        await nc.close()
    assert info.state.messages == 5


async def _refused(settings: Settings) -> str:
    with pytest.raises(ServerUnavailableError) as refused:
        await connect_nats(replace(settings, connect_timeout=3.0))
    return str(refused.value)


@pytest.fixture
def password_server() -> Iterator[EmbeddedNats]:
    yield from _server("--user", "relay", "--pass", "pw-s3cret-4711")


async def test_user_and_password(outbox: Settings, password_server: EmbeddedNats) -> None:
    settings = replace(outbox, nats_urls=(password_server.url,))
    await _relays_through(replace(settings, nats_auth=NatsAuth("relay", "pw-s3cret-4711")))
    message = await _refused(replace(settings, nats_auth=NatsAuth("relay", "wrong")))
    assert "authorization" in message.lower()
    assert "wrong" not in message


async def test_token(outbox: Settings) -> None:
    with EmbeddedNats(extra_args=("--auth", "tok-7x9q")) as server:
        settings = replace(outbox, nats_urls=(server.url,))
        await _relays_through(replace(settings, nats_auth=NatsAuth(token="tok-7x9q")))
        await _refused(settings)


async def test_nkey(outbox: Settings, tmp_path: Path) -> None:
    raw_seed = bytes(nacl.signing.SigningKey.generate())
    seed = nkeys.encode_seed(raw_seed, nkeys.PREFIX_BYTE_USER)
    public_key = nkeys.from_seed(seed).public_key.decode()
    seed_file = tmp_path / "relay.nk"
    seed_file.write_bytes(seed)
    config = tmp_path / "nats.conf"
    config.write_text(f'authorization {{ users = [ {{ nkey: "{public_key}" }} ] }}\n')
    with EmbeddedNats(extra_args=("-c", str(config))) as server:
        settings = replace(outbox, nats_urls=(server.url,))
        await _relays_through(replace(settings, nats_auth=NatsAuth(nkey_seed_file=str(seed_file))))
        await _refused(settings)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


async def test_mutual_tls(outbox: Settings, ca: trustme.CA, tmp_path: Path) -> None:
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("outbox-relay@example.test")
    ca_file, server_pem, client_pem = (
        tmp_path / "ca.pem",
        tmp_path / "server.pem",
        tmp_path / "client.pem",
    )
    ca.cert_pem.write_to_path(str(ca_file))
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(server_pem))
    client_cert.private_key_and_cert_chain_pem.write_to_path(str(client_pem))
    tls_args = ("--tls", "--tlscert", str(server_pem), "--tlskey", str(server_pem))
    verify_args = ("--tlsverify", "--tlscacert", str(ca_file))
    with EmbeddedNats(extra_args=(*tls_args, *verify_args)) as server:
        settings = replace(outbox, nats_urls=(server.url.replace("nats://", "tls://"),))
        mutual = NatsAuth(
            tls_ca_file=str(ca_file), tls_cert_file=str(client_pem), tls_key_file=str(client_pem)
        )
        await _relays_through(replace(settings, nats_auth=mutual))
        # Without a client certificate the server hangs up.
        await _refused(replace(settings, nats_auth=NatsAuth(tls_ca_file=str(ca_file))))
        # A server certificate from a CA we do not trust is refused by us.
        other_ca = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other_ca))
        untrusted = replace(mutual, tls_ca_file=str(other_ca))
        assert "certificate" in (await _refused(replace(settings, nats_auth=untrusted))).lower()


def _keys(prefix: int) -> tuple[bytes, Any, str]:
    seed = nkeys.encode_seed(bytes(nacl.signing.SigningKey.generate()), prefix)
    pair = nkeys.from_seed(seed)
    return seed, pair, pair.public_key.decode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _jwt(issuer: Any, subject: str, name: str, nats_claims: dict[str, Any]) -> str:
    """A NATS v2 JWT, signed by ``issuer``'s nkey (what nsc would write)."""
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "sub": subject,
        "name": name,
        "nats": {**nats_claims, "version": 2},
    }
    digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    payload = _b64(json.dumps(claims).encode())
    return f"{header}.{payload}.{_b64(issuer.sign(f'{header}.{payload}'.encode()))}"


def _operator_mode(tmp_path: Path) -> tuple[Path, Path]:
    """A server config trusting a throw-away operator, and a creds file for a user of
    an account with JetStream."""
    _, operator, operator_key = _keys(nkeys.PREFIX_BYTE_OPERATOR)
    _, account, account_key = _keys(nkeys.PREFIX_BYTE_ACCOUNT)
    _, _, system_key = _keys(nkeys.PREFIX_BYTE_ACCOUNT)
    user_seed, _, user_key = _keys(nkeys.PREFIX_BYTE_USER)
    unlimited = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1}
    unlimited |= {"wildcards": True, "conn": -1, "leaf": -1}
    jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    operator_jwt = _jwt(operator, operator_key, "op", {"type": "operator"})
    account_jwt = _jwt(
        operator, account_key, "relay", {"type": "account", "limits": unlimited | jetstream}
    )
    system_jwt = _jwt(operator, system_key, "SYS", {"type": "account", "limits": unlimited})
    user_limits = {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}
    user_jwt = _jwt(account, user_key, "relay", {"type": "user", **user_limits})
    config = tmp_path / "operator.conf"
    config.write_text(
        f'operator: "{operator_jwt}"\nsystem_account: {system_key}\nresolver: MEMORY\n'
        f'resolver_preload: {{\n  {account_key}: "{account_jwt}"\n'
        f'  {system_key}: "{system_jwt}"\n}}\n'
    )
    creds = tmp_path / "relay.creds"
    creds.write_text(
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user_seed.decode()}\n------END USER NKEY SEED------\n"
    )
    return config, creds


async def test_creds_file(outbox: Settings, tmp_path: Path) -> None:
    config, creds = _operator_mode(tmp_path)
    with EmbeddedNats(extra_args=("-c", str(config))) as server:
        settings = replace(outbox, nats_urls=(server.url,))
        await _relays_through(replace(settings, nats_auth=NatsAuth(creds_file=str(creds))))
        await _refused(settings)


async def test_refused_credentials_end_the_start_at_once(
    outbox: Settings, password_server: EmbeddedNats
) -> None:
    """No retry of a refused password is let in: it used to wait out the connect timeout."""
    settings = replace(
        outbox,
        nats_urls=(password_server.url,),
        nats_auth=NatsAuth("relay", "wrong"),
        connect_timeout=20.0,
    )
    started = time.monotonic()
    with pytest.raises(CredentialsRefusedError) as refused:
        await connect_nats(settings)
    assert time.monotonic() - started < 5
    assert refused.value.exit_code == 2  # a setting to fix, not a server to wait for
    assert "refused the connection (nats: 'Authorization Violation')" in str(refused.value)
